package batch

import (
	"fmt"
	"strings"
	"testing"
)

// Each item fills in the bulk operation's item references: escaped in a
// path and a query, as text in headers and the key, with its type where a
// body string is one reference; without a body template, the body stays
// the item.
func TestItemTemplates(t *testing.T) {
	lim := ptLimits(t, nil)
	for _, c := range []struct {
		name, body string
		// of the second item's operation
		target, header, key, opBody, ctype string
	}{
		{"path", `{"operation":{"method":"PATCH","path":"/users/{{item.id}}"},"items":[{"id":1},{"id":"a b/c","n":2}]}`,
			"/users/a%20b%2Fc", "", "", `{"id":"a b/c","n":2}`, "application/json"},
		{"query", `{"operation":{"path":"/users?email={{item.e}}&x=1"},"items":[{"e":"a"},{"e":"b+c@x.org"}]}`,
			"/users?email=b%2Bc%40x.org&x=1", "", "", `{"e":"b+c@x.org"}`, "application/json"},
		{"nested path", `{"operation":{"path":"/a/{{item.acct.id}}/{{item.tags.1}}"},"items":[{},{"acct":{"id":7},"tags":["x","y"]}]}`,
			"", "", "", "", ""}, // the first item lacks them: refused, checked below
		{"whole path", `{"operation":{"path":"{{item.p}}"},"items":[{"p":"/a"},{"p":"/users/2?x=1"}]}`,
			"/users/2?x=1", "", "", `{"p":"/users/2?x=1"}`, "application/json"},
		{"header and key", `{"operation":{"path":"/a","key":"acct-{{item.a}}","headers":{"X-Row":"{{item.n}}","Content-Type":"application/merge-patch+json"}},"items":[{"a":1,"n":1},{"a":"Z","n":2.5}]}`,
			"/a", "2.5", "acct-Z", `{"a":"Z","n":2.5}`, "application/merge-patch+json"},
		{"body template", `{"operation":{"method":"PATCH","path":"/users/{{item.id}}","body":{"name":"{{item.name}}","age":"{{item.age}}","note":"id {{item.id}}","keep":[1,{"k":"{{x.body}}"}]}},"items":[{"id":1,"name":"A","age":3},{"id":2,"name":"B \"b\"","age":40}]}`,
			"/users/2", "", "", `{"name":"B \"b\"","age":40,"note":"id 2","keep":[1,{"k":"{{x.body}}"}]}`, "application/json"},
		{"text body template", `{"operation":{"path":"/a","body":"hello {{item.name}}"},"items":[{"name":"a"},{"name":"b"}]}`,
			"/a", "", "", "hello b", "text/plain; charset=utf-8"},
		{"constant body", `{"operation":{"path":"/a/{{item.id}}","body":{"active":false}},"items":[{"id":1},{"id":2}]}`,
			"/a/2", "", "", `{"active":false}`, "application/json"},
		{"key without template", `{"operation":{"path":"/a","key":"all"},"items":[1,2]}`,
			"/a", "", "all", "2", "application/json"},
	} {
		t.Run(c.name, func(t *testing.T) {
			if c.target == "" {
				ptMatchFaults(t, c.body, ptFaults(t, lim, c.body), []ptFault{{0, "0", `no "acct.id" in the item`}})
				return
			}
			op := ptParse(t, lim, c.body).ops[1]
			got := op.url.RequestURI()
			if got != c.target || op.header.Get("X-Row") != c.header || op.key != c.key ||
				string(op.body) != c.opBody || op.header.Get("Content-Type") != c.ctype {
				t.Errorf("got %s, X-Row %q, key %q, body %s, type %q", got, op.header.Get("X-Row"), op.key, op.body, op.header.Get("Content-Type"))
			}
		})
	}
	// The bytes item templates make are bounded like references': a
	// template repeating a large value cannot make a large batch.
	small := ptLimits(t, &Handler{MaxReferenceSize: 4096})
	big := strings.Repeat("v", 1000)
	body := `{"operation":{"path":"/a","body":{"a":"{{item.v}}{{item.v}}","b":"{{item.v}}"}},"items":[{"v":"` + big + `"},{"v":"` + big + `"}]}`
	ptMatchFaults(t, body, ptFaults(t, small, body), []ptFault{{1, "1", "item templates would make more than max_reference_size (4096 bytes)"}})
}

// Item templates through Caddy: a sync bulk batch and a streamed job of
// PATCH /users/{{item.id}}, each item patching its own user; a job whose
// item lacks the id is refused whole, naming it.
func TestItemTemplatesRun(t *testing.T) {
	be := newBackend(t)
	for i := range 30 {
		be.seed(fmt.Sprintf("u%d", i+1))
	}
	base := startCaddy(t, proxySite(be, `{
		max_ops 10
		async {
			workers 2
		}
	}`))
	_, _, body := send(t, "POST", base+"/batch", `{"operation":{"method":"PATCH","path":"/users/{{item.id}}","headers":{"X-Row":"{{item.id}}"},
		"body":{"name":"{{item.name}}"}},"items":[{"id":1,"name":"one"},{"id":2,"name":"two"}]}`)
	if res := mustJSON(t, body); res.Get("succeeded").Int() != 2 {
		t.Fatalf("sync bulk: %s", body)
	}
	var items []string
	for i := 3; i <= 30; i++ {
		items = append(items, fmt.Sprintf(`{"id":%d,"name":"n%d"}`, i, i))
	}
	// More than max_ops: streamed into storage, each chunk rebuilt from
	// the template.
	id := submitJob(t, base+"/batch", `{"operation":{"method":"PATCH","path":"/users/{{item.id}}","body":{"name":"{{item.name}}"}},
		"items":[`+strings.Join(items, ",")+`]}`)
	if p := waitJob(t, base+"/batch/"+id, alice, "completed"); p.Get("succeeded").Int() != 28 {
		t.Errorf("job: %s", p.Raw)
	}
	for i := 1; i <= 30; i++ {
		want := fmt.Sprintf("n%d", i)
		if i <= 2 {
			want = []string{"one", "two"}[i-1]
		}
		if u, _ := be.API.Get(i); u.Name != want {
			t.Errorf("user %d is %q, want %q", i, u.Name, want)
		}
	}
	for _, s := range be.requests() {
		if s.Path == "/users/1" && s.Header.Get("X-Row") != "1" {
			t.Errorf("X-Row of user 1: %q", s.Header.Get("X-Row"))
		}
	}
	status, _, body := send(t, "POST", base+"/batch", `{"operation":{"method":"PATCH","path":"/users/{{item.id}}"},"items":[`+
		strings.Repeat(`{"id":1},`, 12)+`{"name":"x"}]}`, alice, "Prefer: respond-async")
	if status != 400 || !strings.Contains(body, `{"index":12,"id":"12","message":"path: no \"id\" in the item"}`) {
		t.Errorf("streamed items with a fault: %d %s", status, body)
	}
	n := len(be.requests())
	if n != 30 {
		t.Errorf("the backend saw %d requests, want 30", n)
	}
}
