package batch

import (
	"encoding/base64"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// graphSite serves batches at /v1.0/$batch, as Microsoft Graph does, in
// front of the users API under /v1.0.
func graphSite(be *backend, batchBlock string) string {
	return fmt.Sprintf(`
	batch /v1.0/$batch /v1.0/$batch/* %s
	handle_path /v1.0/* {
		reverse_proxy %s
	}`, batchBlock, be.addr())
}

func TestJSONBatchAsGraph(t *testing.T) {
	be := newBackend(t)
	be.seed("Ann") // user 1
	base := startCaddy(t, graphSite(be, ""))
	status, hdr, body := send(t, "POST", base+"/v1.0/$batch", `{"requests":[
		{"id":"1","method":"GET","url":"/users/1"},
		{"id":"2","method":"POST","url":"/users","headers":{"Content-Type":"application/json"},"body":{"name":"Bob"}},
		{"id":"3","method":"PATCH","url":"users/2","dependsOn":["2"],"headers":{"content-type":"application/json"},"body":{"balance":5}},
		{"id":"4","method":"GET","url":"$2","dependsOn":["3"]},
		{"id":"5","method":"DELETE","url":"/users/1"},
		{"id":"6","method":"GET","url":"/users/999"},
		{"id":"7","method":"GET","url":"/users","dependsOn":["6"]},
		{"id":"8","method":"POST","url":"/echo","headers":{"Content-Type":"application/octet-stream"},"body":"`+base64.RawURLEncoding.EncodeToString([]byte{0xff, 0xfe, '?', '>'})+`"},
		{"id":"9","method":"POST","url":"/echo","headers":{"Content-Type":"text/csv"},"body":"a,b\n"},
		{"id":"10","method":"GET","url":"/binary"}
	]}`)
	if status != 200 || hdr.Get("Content-Type") != "application/json" {
		t.Fatalf("status %d %s: %s", status, hdr.Get("Content-Type"), body)
	}
	res := mustJSON(t, body)
	if n := len(res.Get("responses").Array()); n != 10 || res.Get("results").Exists() {
		t.Fatalf("%d responses: %s", n, body)
	}
	want := []struct {
		id     string
		status int64
	}{{"1", 200}, {"2", 201}, {"3", 200}, {"4", 200}, {"5", 204}, {"6", 404}, {"7", 424}, {"8", 200}, {"9", 200}, {"10", 200}}
	for i, w := range want {
		r := res.Get(fmt.Sprintf("responses.%d", i))
		if r.Get("id").String() != w.id || r.Get("status").Int() != w.status {
			t.Errorf("response %d: %s, want id %s status %d", i, r.Raw, w.id, w.status)
		}
	}
	// Graph's SDK reads "body" as JSON under "Content-Type" spelled so.
	if r := res.Get("responses.1"); r.Get("body.name").String() != "Bob" || r.Get("headers.Location").String() != "/users/2" ||
		r.Get("headers.Content-Type").String() != "application/json" {
		t.Errorf("created: %s", r.Raw)
	}
	if r := res.Get("responses.3"); r.Get("body.balance").Int() != 5 {
		t.Errorf("$2 is the Location of request 2: %s", r.Raw)
	}
	if r := res.Get("responses.6"); r.Get("body.error.code").String() != "FailedDependency" || !strings.Contains(r.Get("body.error.message").String(), "dependency 6 failed") {
		t.Errorf("failed dependency: %s", r.Raw)
	}
	if r := res.Get("responses.7"); r.Get("body.body_b64").String() != base64.StdEncoding.EncodeToString([]byte{0xff, 0xfe, '?', '>'}) {
		t.Errorf("base64url body for a binary Content-Type: %s", r.Raw)
	}
	if r := res.Get("responses.8"); r.Get("body.body").String() != "a,b\n" {
		t.Errorf("text body for a text Content-Type: %s", r.Raw)
	}
	// A binary answer comes back base64url, as OData says.
	if r := res.Get("responses.9"); r.Get("body").String() != base64.RawURLEncoding.EncodeToString([]byte{0xff, 0x00, 0xfe, 0x01}) {
		t.Errorf("binary answer: %s", r.Raw)
	}
	// The urls as the API saw them: under the service root /v1.0.
	var paths []string
	for _, r := range be.requests() {
		paths = append(paths, r.Method+" "+r.Path)
	}
	if got := strings.Join(paths, ","); got != "GET /users/1,POST /users,PATCH /users/2,GET /users/2,DELETE /users/1,GET /users/999,POST /echo,POST /echo,GET /binary" {
		t.Errorf("backend saw %s", got)
	}
}

// An invalid JSON batch is refused whole, with Graph's and OData's error
// object; nothing runs (serveAlone fails a test that sends anything on).
func TestJSONBatchRefused(t *testing.T) {
	t.Parallel()
	h := handlerAlone(t, &Handler{MaxOps: 4})
	for name, c := range map[string]struct {
		body    string
		status  int
		details []string
	}{
		"faults": {`{"requests":[{"method":"GET","url":"/users"},{"id":"b","url":"http://evil/"},{"id":"c","url":"/users","if":"$b/$succeeded and $zz/$succeeded"},
			{"id":"d","url":"/users","dependsOn":["nope"]}]}`, 400,
			[]string{"id is required", "origin-form", `if names unknown operation "zz"`, `unknown operation "nope"`}},
		"native fields": {`{"requests":[{"id":"1","url":"/a"}],"batch":[]}`, 400, []string{`unknown field "batch"`}},
		"too many":      {`{"requests":[{"id":"1","url":"/a"},{"id":"2","url":"/a"},{"id":"3","url":"/a"},{"id":"4","url":"/a"},{"id":"5","url":"/a"}]}`, 413, nil},
		"groups apart": {`{"requests":[{"id":"1","url":"/a","atomicityGroup":"g"},{"id":"2","url":"/a"},{"id":"3","url":"/a","atomicityGroup":"g"}]}`, 400,
			[]string{`operations of atomicityGroup "g" must be adjacent`}},
	} {
		w := serveAlone(t, h, request(t, "POST", "http://127.0.0.1/v1.0/$batch", c.body))
		status, body := w.Code, w.Body.String()
		res := mustJSON(t, body)
		if status != c.status || res.Get("error.code").String() == "" || res.Get("error.message").String() == "" {
			t.Errorf("%s: %d %s", name, status, body)
			continue
		}
		details := res.Get("error.details").Array()
		for _, want := range c.details {
			found := false
			for _, d := range details {
				found = found || strings.Contains(d.Get("message").String(), want)
			}
			if !found {
				t.Errorf("%s: no detail says %q: %s", name, want, body)
			}
		}
	}
}

// An atomicity group runs in order; its first failure skips the rest of
// it and rolls back what of it succeeded, and a request depending on the
// group is not run. Another group is untouched.
func TestJSONBatchAtomicityGroups(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, graphSite(be, `{
		mode parallel
	}`))
	status, _, body := send(t, "POST", base+"/v1.0/$batch", `{"requests":[
		{"id":"a1","atomicityGroup":"g1","method":"POST","url":"/users","body":{"name":"A"},
		 "rollback":{"method":"DELETE","url":"/users/{{a1.body.id}}"}},
		{"id":"a2","atomicityGroup":"g1","method":"POST","url":"/users","body":{}},
		{"id":"a3","atomicityGroup":"g1","method":"POST","url":"/users","body":{"name":"Never"}},
		{"id":"after","dependsOn":["g1"],"method":"GET","url":"/users"},
		{"id":"b1","atomicityGroup":"g2","method":"POST","url":"/users","body":{"name":"B"}},
		{"id":"b2","atomicityGroup":"g2","method":"GET","url":"$b1"}
	]}`)
	if status != 200 {
		t.Fatalf("status %d: %s", status, body)
	}
	res := mustJSON(t, body)
	for i, w := range []int64{424, 422, 424, 424, 201, 200} {
		r := res.Get(fmt.Sprintf("responses.%d", i))
		if r.Get("status").Int() != w {
			t.Errorf("response %d: %s, want %d", i, r.Raw, w)
		}
	}
	if g := res.Get("responses.0.atomicityGroup").String(); g != "g1" {
		t.Errorf("atomicityGroup of the response: %q", g)
	}
	if msg := res.Get("responses.0.body.error.message").String(); !strings.Contains(msg, "rolled back") {
		t.Errorf("rolled back: %s", res.Get("responses.0").Raw)
	}
	// The groups run in parallel: A and B are users 1 and 2 in either order.
	a, b := be.API.Get(1)
	if !b || a.Name != "B" {
		a, b = be.API.Get(2)
	}
	if be.API.Len() != 1 || !b || a.Name != "B" {
		t.Errorf("want only the other group's user left, %d users", be.API.Len())
	}
	for _, r := range be.requests() {
		if strings.Contains(string(r.Body), "Never") {
			t.Error("a request after the group's failure ran")
		}
	}
}

// The service root: absolute urls under it unless they are already, and
// "/" to leave them as written; relative urls against the batch URL.
func TestJSONBatchURLs(t *testing.T) {
	t.Parallel()
	for _, c := range []struct {
		batchPath, root, url, want string
	}{
		{"/v1.0/$batch", "", "/me", "/v1.0/me"},
		{"/v1.0/$batch", "", "/v1.0/me", "/v1.0/me"},
		{"/v1.0/$batch", "", "me?x=1", "/v1.0/me?x=1"},
		{"/service/$batch", "", "/service/Customers", "/service/Customers"},
		{"/service/$batch", "/", "/other", "/other"},
		{"/api/batch", "/api/v2", "/users", "/api/v2/users"},
		{"/batch", "", "/users/1", "/users/1"},
		{"/batch", "", "users/1", "/users/1"},
		{"/$batch", "", "$1/orders", "{{1.location}}/orders"},
		{"/$batch", "", "$metadata", "/$metadata"},
		{"/batch", "", "http://evil/x", "http://evil/x"},
		{"/batch", "", "//evil/x", "//evil/x"},
	} {
		if got := newURLResolver(c.batchPath, c.root).resolve(c.url); got != c.want {
			t.Errorf("%s at %s (root %q): %q, want %q", c.url, c.batchPath, c.root, got, c.want)
		}
	}
}

// The Content-Type of a JSON batch stays one a browser cannot send
// cross-site without a preflight, and a JSON batch may be sent async.
func TestJSONBatchAsync(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, asyncSite(be, ""))
	status, hdr, body := send(t, "POST", base+"/batch", `{"requests":[{"id":"x","method":"GET","url":"/health"}]}`, alice, "Prefer: respond-async")
	if status != 202 {
		t.Fatalf("submit: %d %s", status, body)
	}
	job := base + hdr.Get("Location")
	waitJob(t, job, alice, "completed")
	status, _, body = send(t, "GET", job+"/results", "", alice)
	if r := mustJSON(t, body).Get("responses.0"); status != 200 || r.Get("id").String() != "x" || r.Get("status").Int() != 200 {
		t.Errorf("results of a JSON batch job: %d %s", status, body)
	}
	status, _, _ = send(t, "POST", base+"/batch", `{"requests":[{"id":"x","url":"/health"}]}`, "Content-Type: text/plain")
	if status != http.StatusUnsupportedMediaType {
		t.Errorf("text/plain: %d", status)
	}
}

// Microsoft Graph's Python SDK (msgraph-core) writes "depends_on" on every
// step, [] when there is none, and lower-case header names: it is taken as
// dependsOn, and honoured. Both at once is the usual duplicate.
func TestJSONBatchDependsOnSnakeCase(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, graphSite(be, ""))
	const (
		u1 = "8c3c3b4e-9e0a-4a59-b3f4-2b1c5e1d0a01"
		u2 = "8c3c3b4e-9e0a-4a59-b3f4-2b1c5e1d0a02"
		u3 = "8c3c3b4e-9e0a-4a59-b3f4-2b1c5e1d0a03"
		u4 = "8c3c3b4e-9e0a-4a59-b3f4-2b1c5e1d0a04"
	)
	status, _, body := send(t, "POST", base+"/v1.0/$batch", `{"requests":[
		{"id":"`+u1+`","method":"POST","url":"/users","depends_on":[],"headers":{"content-type":"application/json"},"body":{"name":"Py"}},
		{"id":"`+u2+`","method":"GET","url":"/users/1","depends_on":["`+u1+`"],"headers":{}},
		{"id":"`+u3+`","method":"GET","url":"/users/999","depends_on":[],"headers":{}},
		{"id":"`+u4+`","method":"GET","url":"/users","depends_on":["`+u3+`"],"headers":{}}]}`)
	if status != 200 {
		t.Fatalf("status %d: %s", status, body)
	}
	res := mustJSON(t, body)
	for i, want := range []int64{201, 200, 404, 424} {
		if r := res.Get(fmt.Sprintf("responses.%d", i)); r.Get("status").Int() != want {
			t.Errorf("response %d: %s, want %d", i, r.Raw, want)
		}
	}
	var got []string
	for _, r := range be.requests() {
		got = append(got, r.Method+" "+r.Path)
	}
	if strings.Join(got, ",") != "POST /users,GET /users/1,GET /users/999" {
		t.Errorf("backend saw %v", got)
	}
	status, _, body = send(t, "POST", base+"/v1.0/$batch", `{"requests":[
		{"id":"1","url":"/users"},
		{"id":"2","url":"/users","dependsOn":["1"],"depends_on":["1"]}]}`)
	if status != 400 || !strings.Contains(body, "given twice") {
		t.Errorf("both spellings: %d %s", status, body)
	}
}

// "requests" given twice is refused, as a native envelope field given
// twice is: JSON readers differ on which one counts (gjson's Get, which
// found it a JSON batch, reads the first; the decoder ran the last).
func TestJSONBatchRequestsTwice(t *testing.T) {
	t.Parallel()
	lim := ptLimits(t, nil)
	r := httptest.NewRequest(http.MethodPost, "/$batch", nil)
	b, err := jsonBatch.decode(r, []byte(`{"requests":[{"id":"1","url":"/a"}],"requests":[{"id":"1","method":"DELETE","url":"/b"}]}`), lim)
	if err == nil {
		t.Fatalf("accepted, running %s %s", b.ops[0].method, b.ops[0].target)
	}
	if !strings.Contains(err.Error(), `field "requests" given twice`) {
		t.Errorf("refused with %v", err)
	}
}
