package batch

import (
	"bytes"
	"context"
	"fmt"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/tidwall/gjson"
)

// rerunSite is a site whose jobs belong to X-Tenant, so that a rerun can
// bring other credentials than the job it reruns: a token renewed since.
func rerunSite(be *backend, batchBlock string) string {
	return proxySite(be, `{
		max_ops 10000
		`+batchBlock+`
		async {
			retention 1h
			owner {http.request.header.X-Tenant}
		}
	}`)
}

const (
	tenant   = "X-Tenant: acme"
	oldToken = "Authorization: Bearer old"
	newToken = "Authorization: Bearer new"
)

// submitAs submits an async batch with headers and returns its id.
func submitAs(t *testing.T, url, body string, headers ...string) string {
	t.Helper()
	status, _, resp := send(t, "POST", url, body, append([]string{"Prefer: respond-async"}, headers...)...)
	if status != 202 {
		t.Fatalf("submit: %d %s", status, resp)
	}
	return mustJSON(t, resp).Get("id").String()
}

// rerunOf asks for a rerun of job, expecting 202: the new job's progress,
// whose Location it checks.
func rerunOf(t *testing.T, base, id, body string, headers ...string) gjson.Result {
	t.Helper()
	status, hdr, resp := send(t, "POST", base+"/batch/"+id+"/retry", body, headers...)
	if status != 202 {
		t.Fatalf("retry: %d %s", status, resp)
	}
	p := mustJSON(t, resp)
	if p.Get("retry_of").String() != id || p.Get("status").String() != "queued" || hdr.Get("Location") != "/batch/"+p.Get("id").String() {
		t.Errorf("retry answered %v %s", hdr, resp)
	}
	return p
}

// results reads every result of an ended job, as a page and as NDJSON,
// and checks that both say the same.
func results(t *testing.T, base, id string, headers ...string) []gjson.Result {
	t.Helper()
	_, _, page := send(t, "GET", base+"/batch/"+id+"/results", "", headers...)
	rs := mustJSON(t, page).Get("results").Array()
	_, _, nd := send(t, "GET", base+"/batch/"+id+"/results", "", append(headers, "Accept: application/x-ndjson")...)
	lines, _ := ndjsonLines(t, nd)
	if len(lines) != len(rs) {
		t.Fatalf("%d results paged, %d as NDJSON", len(rs), len(lines))
	}
	for i, l := range lines {
		if l.Get("source_index").Raw != rs[i].Get("source_index").Raw || l.Get("id").String() != rs[i].Get("id").String() {
			t.Errorf("result %d paged %s, as NDJSON %s", i, rs[i].Raw, l.Raw)
		}
	}
	return rs
}

func field(rs []gjson.Result, path string) []string {
	var out []string
	for _, r := range rs {
		out = append(out, r.Get(path).String())
	}
	return out
}

// authorizations are the Authorization headers the backend saw on
// requests whose path starts with prefix.
func authorizations(be *backend, prefix string) []string {
	var out []string
	for _, r := range be.requests() {
		if strings.HasPrefix(r.Path, prefix) {
			out = append(out, r.Header.Get("Authorization"))
		}
	}
	return out
}

// A job stored whole, with dependencies, whose failures the API answers
// once it is fixed: the rerun runs each failed operation with those
// skipped because of it (its dependent, its condition), in their order,
// with the options of the original and the credentials of the retry, and
// every result says which operation of the original it reruns.
func TestRerunWholeJob(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, rerunSite(be, ""))
	id := submitAs(t, base+"/batch", `{"mode":"parallel","include_headers":false,"batch":[
		{"id":"ok","path":"/slow?d=0s"},
		{"id":"bad","method":"POST","path":"/limited?id=w1&n=1&status=500","headers":{"X-Trace":"t1"},"body":{"name":"Ann"}},
		{"id":"after","path":"/echo/{{bad.body.calls}}"},
		{"id":"ok2","path":"/slow?d=0s"},
		{"id":"bad2","path":"/limited?id=w2&n=1&status=500"},
		{"id":"cond","path":"/echo/cond","if":"succeeded(bad2)"}]}`, tenant, oldToken)
	p := waitJob(t, base+"/batch/"+id, tenant, "completed")
	if p.Get("failed").Int() != 2 || p.Get("skipped").Int() != 2 {
		t.Fatalf("original: %s", p.Raw)
	}

	re := rerunOf(t, base, id, "", tenant, newToken)
	if re.Get("total").Int() != 4 {
		t.Errorf("rerun of 2 failed and 2 skipped: %s", re.Raw)
	}
	rid := re.Get("id").String()
	p = waitJob(t, base+"/batch/"+rid, tenant, "completed")
	if p.Get("succeeded").Int() != 4 || p.Get("retry_of").String() != id {
		t.Errorf("rerun: %s", p.Raw)
	}
	rs := results(t, base, rid, tenant)
	if got := field(rs, "id"); !slices.Equal(got, []string{"bad", "after", "bad2", "cond"}) {
		t.Errorf("rerun ids %v", got)
	}
	if got := field(rs, "source_index"); !slices.Equal(got, []string{"1", "2", "4", "5"}) {
		t.Errorf("rerun source_index %v", got)
	}
	if rs[1].Get("body.uri").String() != "/echo/2" || rs[3].Get("status").Int() != 200 {
		t.Errorf("the dependent read the rerun failure's answer, the condition held: %s %s", rs[1].Raw, rs[3].Raw)
	}
	if slices.ContainsFunc(rs, func(r gjson.Result) bool { return r.Get("headers").Exists() }) {
		t.Errorf("include_headers false of the original not kept: %s", rs[0].Raw)
	}
	// What it sent: the request as submitted, with the retry's credentials.
	var sent *seen
	for _, r := range be.requests() {
		if r.Path == "/limited?id=w1&n=1&status=500" {
			sent = &r
		}
	}
	if sent == nil || sent.Method != "POST" || sent.Header.Get("X-Trace") != "t1" || string(sent.Body) != `{"name":"Ann"}` {
		t.Errorf("the rerun of bad sent %+v", sent)
	}
	for prefix, want := range map[string][]string{
		"/limited?id=w1": {"Bearer old", "Bearer new"},
		"/echo/2":        {"Bearer new"},
		"/echo/cond":     {"Bearer new"},
	} {
		if got := authorizations(be, prefix); !slices.Equal(got, want) {
			t.Errorf("%s sent with %v, want %v", prefix, got, want)
		}
	}
	// Filtered views of the rerun say it too.
	_, _, body := send(t, "GET", base+"/batch/"+rid+"/results?outcome=succeeded", "", tenant)
	if got := field(mustJSON(t, body).Get("results").Array(), "source_index"); !slices.Equal(got, []string{"1", "2", "4", "5"}) {
		t.Errorf("filtered rerun results: %s", body)
	}

	// Nothing of the rerun failed: nothing to rerun.
	status, _, body := send(t, "POST", base+"/batch/"+rid+"/retry", "", tenant)
	if status != 409 || !strings.Contains(body, "no failed or skipped operations") {
		t.Errorf("rerun of a job without failures: %d %s", status, body)
	}
}

// A normal submission cannot claim a source_index: it is an unknown field
// of an operation, in a batch and in a streamed job.
func TestSourceIndexIsNoClientField(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, rerunSite(be, ""))
	for _, c := range []struct {
		body    string
		headers []string
	}{
		{`[{"path":"/slow?d=0s","source_index":3}]`, nil},
		{`{"async":true,"batch":[{"path":"/slow?d=0s","source_index":3}]}`, nil},
		{`{"path":"/slow?d=0s","source_index":3}` + "\n", []string{"Content-Type: application/x-ndjson"}},
	} {
		status, _, body := send(t, "POST", base+"/batch", c.body, append([]string{tenant}, c.headers...)...)
		if status != 400 || !strings.Contains(body, `unknown field \"source_index\"`) {
			t.Errorf("%s: %d %s", c.body, status, body)
		}
	}
	if len(be.requests()) != 0 {
		t.Errorf("a batch claiming source_index ran")
	}
}

// A streamed job (NDJSON, more operations than a chunk, more failures
// than a part of the failures stream) is rerun through the streamed
// intake: its failures, in order, each with its source_index, the options
// of its options line kept, the credentials of the retry sent.
func TestRerunStreamedJob(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, rerunSite(be, `mode parallel
		concurrency 16`))
	const n = 2*failuresPerPart + 200
	var sb strings.Builder
	sb.WriteString(`{"mode":"parallel","omit_response_on_success":true,"max_failures":100000,"metadata":{"import":"crm"}}` + "\n")
	var failing []string
	for i := range n {
		if i%2 == 1 || i > n-100 { // past a part of failures, and a chunk of operations
			fmt.Fprintf(&sb, `{"path":"/limited?id=s%d&n=1&status=500"}`+"\n", i)
			failing = append(failing, fmt.Sprint(i))
			continue
		}
		fmt.Fprintf(&sb, `{"path":"/slow?d=0s"}`+"\n")
	}
	status, _, resp := send(t, "POST", base+"/batch", sb.String(), tenant, oldToken, "Content-Type: application/x-ndjson")
	if status != 202 {
		t.Fatalf("%d %s", status, resp)
	}
	id := mustJSON(t, resp).Get("id").String()
	p := waitJobFor(t, 60*time.Second, base+"/batch/"+id, tenant, "completed")
	if p.Get("failed").Int() != int64(len(failing)) {
		t.Fatalf("original: %s, want %d failed", p.Raw, len(failing))
	}

	re := rerunOf(t, base, id, `{"outcome":["failed"]}`, tenant, newToken)
	if re.Get("total").Int() != int64(len(failing)) {
		t.Errorf("rerun: %s, want %d operations", re.Raw, len(failing))
	}
	rid := re.Get("id").String()
	p = waitJobFor(t, 60*time.Second, base+"/batch/"+rid, tenant, "completed")
	if p.Get("succeeded").Int() != int64(len(failing)) || p.Get("retry_of").String() != id {
		t.Errorf("rerun: %s", p.Raw)
	}
	if p.Get("metadata.import").String() != "crm" {
		t.Errorf("metadata of the original not kept: %s", p.Raw)
	}
	rs := results(t, base, rid, tenant)
	if got := field(rs, "source_index"); !slices.Equal(got, failing) {
		t.Errorf("rerun source_index: %d of them, want %d", len(got), len(failing))
	}
	if got := field(rs, "id"); !slices.Equal(got, failing) {
		t.Errorf("rerun ids are not those of the original")
	}
	if rs[0].Get("body").Exists() || rs[0].Get("headers").Exists() {
		t.Errorf("omit_response_on_success of the original not kept: %s", rs[0].Raw)
	}
	if got := authorizations(be, "/limited?id=s1&"); !slices.Equal(got, []string{"Bearer old", "Bearer new"}) {
		t.Errorf("a rerun operation sent with %v", got)
	}
	// A page from far in, and a filtered one, say it as well.
	_, _, body := send(t, "GET", fmt.Sprintf("%s/batch/%s/results?offset=%d&limit=2&outcome=succeeded", base, rid, len(failing)-2), "", tenant)
	if got := field(mustJSON(t, body).Get("results").Array(), "source_index"); !slices.Equal(got, failing[len(failing)-2:]) {
		t.Errorf("last page of the rerun: %s", body)
	}
}

// A rerun is refused, and no job made, for a job that has not ended
// (409 with its progress), of another owner or none (404, 401), with a
// body that does not say failed or skipped (400, 413, 415), or that would
// leave an operation depending on one it does not rerun (422, naming
// both).
func TestRerunRefused(t *testing.T) {
	be := newBackend(t)
	storage := t.TempDir()
	base := startCaddy(t, rerunSite(be, ""), inStorage(storage))
	held := submitAs(t, base+"/batch", `[{"path":"/limited?id=r0&n=1&status=500"},{"path":"/hold"}]`, tenant)
	eventually(t, 10*time.Second, "the job to run", func() bool { return len(be.requests()) == 2 })
	status, _, body := send(t, "POST", base+"/batch/"+held+"/retry", "", tenant)
	if status != 409 || mustJSON(t, body).Get("status").String() != "running" {
		t.Errorf("rerun of a running job: %d %s", status, body)
	}
	be.release()
	waitJob(t, base+"/batch/"+held, tenant, "completed")

	// a depends on nothing and succeeds; b depends on a and fails; c
	// depends on b and is skipped; d fails alone.
	id := submitAs(t, base+"/batch", `{"batch":[
		{"id":"a","path":"/slow?d=0s"},
		{"id":"b","path":"/limited?id=r1&n=1&status=500","depends_on":["a"]},
		{"id":"c","path":"/slow?d=0s&{{b.status}}"},
		{"id":"d","path":"/limited?id=r2&n=1&status=500"}]}`, tenant)
	waitJob(t, base+"/batch/"+id, tenant, "completed")
	before := storedJobs(t, storage)
	job := base + "/batch/" + id + "/retry"
	for _, c := range []struct {
		name    string
		body    string
		headers []string
		status  int
		want    string
	}{
		{"another owner", "", []string{"X-Tenant: evil"}, 404, "no such batch job"},
		{"no owner", "", nil, 401, "need an owner"},
		{"a GET", "", []string{tenant}, 405, "batch jobs take POST"},
		{"succeeded", `{"outcome":["succeeded"]}`, []string{tenant}, 400, "outcome succeeded cannot be rerun"},
		{"too large", `{"outcome":["` + strings.Repeat("x", 5000) + `"]}`, []string{tenant}, 413, "at most 4096 bytes"},
		{"text/plain", `{"outcome":["failed"]}`, []string{tenant, "Content-Type: text/plain"}, 415, "Content-Type: application/json"},
		{"form", "", []string{tenant, "Content-Type: application/x-www-form-urlencoded"}, 415, "Content-Type: application/json"},
		// b is rerun without a, which succeeded.
		{"failed", `{"outcome":["failed"]}`, []string{tenant}, 422, `"index":1,"id":"b","message":"depends on \"a\", which succeeded and is not rerun"`},
		// c is rerun without b, which failed.
		{"skipped", `{"outcome":["skipped"]}`, []string{tenant}, 422, `"index":2,"id":"c","message":"depends on \"b\", which failed and is not rerun"`},
		{"both", "", []string{tenant}, 422, `"id":"b","message":"depends on \"a\"`},
	} {
		method := "POST"
		if c.name == "a GET" {
			method = "GET"
		}
		status, hdr, body := send(t, method, job, c.body, c.headers...)
		if status != c.status || !strings.Contains(body, c.want) {
			t.Errorf("%s: %d %s, want %d with %s", c.name, status, body, c.status, c.want)
		}
		if c.status == 405 && hdr.Get("Allow") != "POST" {
			t.Errorf("405 with Allow %q", hdr.Get("Allow"))
		}
	}
	if after := storedJobs(t, storage); !slices.Equal(after, before) {
		t.Errorf("refused reruns stored jobs: %v, before %v", after, before)
	}
	if n := len(be.requests()); n != 5 {
		t.Errorf("the backend got %d requests, want the 5 of the originals", n)
	}
}

// A job that was rolled back, or that kept no failures stream (started
// by an older version), is not rerun: 409 saying why.
func TestRerunConflicts(t *testing.T) {
	be := newBackend(t)
	storage := t.TempDir()
	base := startCaddy(t, rerunSite(be, ""), inStorage(storage))
	id := submitAs(t, base+"/batch", `{"atomicity":"all_or_nothing","batch":[
		{"id":"a","method":"POST","path":"/users","body":{"name":"Ann"},"rollback":{"method":"DELETE","path":"/users/{{a.body.id}}"}},
		{"id":"b","path":"/limited?id=c1&n=1&status=500"},
		{"id":"c","path":"/slow?d=0s"}]}`, tenant)
	waitJob(t, base+"/batch/"+id, tenant, "completed")
	status, _, body := send(t, "POST", base+"/batch/"+id+"/retry", "", tenant)
	if status != 409 || !strings.Contains(body, "was rolled back") {
		t.Errorf("rerun of a job rolled back: %d %s", status, body)
	}

	id = submitAs(t, base+"/batch", `[{"path":"/limited?id=c2&n=1&status=500"}]`, tenant)
	waitJob(t, base+"/batch/"+id, tenant, "completed")
	eventually(t, 5*time.Second, "the job to be forgotten", func() bool { return thePool(t).lookup(id) == nil })
	key := filepath.Join(storage, "batch", "jobs", id, "job")
	rec, err := os.ReadFile(key)
	if err != nil {
		t.Fatal(err)
	}
	old := bytes.Replace(rec, []byte(`"failures":`), []byte(`"unknown":`), 1)
	if bytes.Equal(old, rec) {
		t.Fatalf("no failures in %s", rec)
	}
	if err := os.WriteFile(key, old, 0o600); err != nil {
		t.Fatal(err)
	}
	status, _, body = send(t, "POST", base+"/batch/"+id+"/retry", "", tenant)
	if status != 409 || !strings.Contains(body, "kept no record of its failures") {
		t.Errorf("rerun of a job without a failures stream: %d %s", status, body)
	}
	if n := len(be.requests()); n != 4 {
		t.Errorf("the backend got %d requests, want the 4 of the originals (a rollback among them)", n)
	}
}

// A subset of the failures is rerun as asked: the skipped ones alone,
// or the failed one alone, of a batch that stop_on_error stopped.
func TestRerunOutcomes(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, rerunSite(be, ""))
	id := submitAs(t, base+"/batch", `{"atomicity":"stop_on_error","batch":[
		{"id":"a","path":"/slow?d=0s"},
		{"id":"b","path":"/limited?id=o1&n=1&status=500"},
		{"id":"c","path":"/echo/c"},
		{"id":"d","path":"/echo/d"}]}`, tenant)
	p := waitJob(t, base+"/batch/"+id, tenant, "completed")
	if p.Get("failed").Int() != 1 || p.Get("skipped").Int() != 2 {
		t.Fatalf("original: %s", p.Raw)
	}
	for _, c := range []struct {
		body     string
		ids, src []string
	}{
		{`{"outcome":["skipped"]}`, []string{"c", "d"}, []string{"2", "3"}},
		{`{"outcome":["failed"]}`, []string{"b"}, []string{"1"}},
	} {
		rid := rerunOf(t, base, id, c.body, tenant).Get("id").String()
		waitJob(t, base+"/batch/"+rid, tenant, "completed")
		rs := results(t, base, rid, tenant)
		if got := field(rs, "id"); !slices.Equal(got, c.ids) {
			t.Errorf("%s: rerun %v, want %v", c.body, got, c.ids)
		}
		if got := field(rs, "source_index"); !slices.Equal(got, c.src) {
			t.Errorf("%s: source_index %v, want %v", c.body, got, c.src)
		}
	}
}

// The retry body: the outcomes to rerun, both by default; anything else
// is refused with what is wrong.
func TestParseRerunBody(t *testing.T) {
	const both = 1<<outcomeFailed | 1<<outcomeSkipped
	for _, c := range []struct {
		body string
		want uint8
		msg  string
	}{
		{"", both, ""},
		{" \n", both, ""},
		{`{}`, both, ""},
		{`{"outcome":["failed"]}`, 1 << outcomeFailed, ""},
		{`{"outcome":["skipped"]}`, 1 << outcomeSkipped, ""},
		{`{"outcome":["skipped","failed","failed"]}`, both, ""},
		{`{"outcome":["succeeded"]}`, 0, "outcome succeeded cannot be rerun"},
		{`{"outcome":["failed","succeeded"]}`, 0, "outcome succeeded cannot be rerun"},
		{`{"outcome":"failed"}`, 0, `outcome must be an array of "failed" and "skipped", got "failed"`},
		{`{"outcome":[]}`, 0, "outcome must be an array"},
		{`{"outcome":null}`, 0, "outcome must be an array"},
		{`{"outcome":[1]}`, 0, "unknown outcome 1"},
		{`{"outcome":["Failed"]}`, 0, `unknown outcome "Failed"`},
		{`{"outcome":["failed"],"outcome":["skipped"]}`, 0, `field "outcome" given twice`},
		{`{"outcome":["failed"],"mode":"parallel"}`, 0, `unknown field "mode"`},
		{`["failed"]`, 0, "retry body must be a JSON object"},
		{`"failed"`, 0, "retry body must be a JSON object"},
		{`{"outcome":`, 0, "retry body is not valid JSON"},
		{`{"outcome":[[["failed"]]]}`, 0, "retry body nests JSON deeper than 3 levels"},
		{"{\"outcome\":[\"f\xffailed\"]}", 0, "retry body is not valid UTF-8"},
		{`{"` + strings.Repeat("k", 300) + `":1}`, 0, "unknown field \"" + strings.Repeat("k", maxEcho) + "…\""},
	} {
		got, msg := parseRerunBody([]byte(c.body))
		if got != c.want || !strings.Contains(msg, c.msg) || (msg == "") != (c.msg == "") {
			t.Errorf("%.60s: %b %q, want %b %q", c.body, got, msg, c.want, c.msg)
		}
	}
}

// An operation rerun from the request the failures stream keeps of it is
// the operation submitted, with its source_index; a JSON batch's OData
// condition is written in the native syntax.
func TestRerunOperationIsTheOriginal(t *testing.T) {
	lim := ptLimits(t, nil)
	sources := *lim
	sources.sources = true
	for _, c := range []struct {
		f    format
		body string
	}{
		{native, failureRequestBatches[0]},
		{native, failureRequestBatches[1]},
		{jsonBatch, `{"requests":[
			{"id":"1","method":"GET","url":"/a"},
			{"id":"2","method":"POST","url":"/b","headers":{"Content-Type":"application/json"},"body":"str"},
			{"id":"3","method":"GET","url":"$1/x","dependsOn":["1"],"if":"$1/$succeeded and not ($2/$succeeded)"}]}`},
	} {
		orig, err := c.f.decode(httptest.NewRequest("POST", "/batch", nil), []byte(c.body), lim)
		if err != nil {
			t.Fatalf("%s: %v", c.body, err)
		}
		rerun := []byte(`{"batch":[`)
		for i, op := range orig.ops {
			if i > 0 {
				rerun = append(rerun, ',')
			}
			rerun = appendRerunOp(rerun, i+10, appendRequest(nil, op, orig.ops), c.f == jsonBatch)
		}
		rerun = append(rerun, `],"atomicity":"`+orig.atomicity+`","mode":"`+orig.mode+`"}`...)
		b, err := parseBatch(context.Background(), rerun, &sources)
		if err != nil {
			t.Fatalf("%s\nrerun as %s: %v", c.body, rerun, err)
		}
		for i, o := range orig.ops {
			r := b.ops[i]
			if d := sameOperation(o, r); d != "" || r.source != i+11 {
				t.Errorf("%s: rerun of %s differs: %s, source %d", c.f.name(), o.id, d, r.source)
			}
			if r.cond != nil && r.cond.odata {
				t.Errorf("%s: the rerun's condition is OData's", o.id)
			}
		}
	}
}

// source_index is taken from a rerun's own operations only, and must be
// an index.
func TestSourceIndexParsed(t *testing.T) {
	lim := ptLimits(t, nil)
	sources := *lim
	sources.sources = true
	if _, err := parseBatch(context.Background(), []byte(`[{"path":"/a","source_index":1}]`), lim); err == nil ||
		!strings.Contains(err.Error(), `unknown field "source_index"`) {
		t.Errorf("source_index in a batch: %v", err)
	}
	for _, v := range []string{"-1", "1.5", `"3"`, "1e12", "null"} {
		_, err := parseBatch(context.Background(), []byte(`[{"path":"/a","source_index":`+v+`}]`), &sources)
		if err == nil || !strings.Contains(err.Error(), "source_index must be a whole number") {
			t.Errorf("source_index %s: %v", v, err)
		}
	}
	b := ptParse(t, &sources, `{"operation":{"path":"/a"},"items":[1]}`)
	if b.ops[0].source != 0 {
		t.Errorf("an item has no source_index")
	}
	if _, err := parseBatch(context.Background(), []byte(`{"operation":{"path":"/a","source_index":1},"items":[1]}`), &sources); err == nil {
		t.Errorf("source_index on a bulk operation accepted")
	}
}

// A job submitted as a JSON batch is rerun as a native job: its results
// are native ones, and its OData condition holds once what it tests is
// fixed. An operation of an atomicity group cannot be rerun (422).
func TestRerunJSONBatch(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, rerunSite(be, ""))
	// 2 is skipped, its condition false; rerun with 1, which succeeds
	// now, it runs.
	id := submitAs(t, base+"/batch", `{"requests":[
		{"id":"1","method":"GET","url":"/limited?id=j1&n=1&status=500"},
		{"id":"2","method":"GET","url":"/echo/2","if":"$1/$succeeded"}]}`, tenant)
	waitJob(t, base+"/batch/"+id, tenant, "completed")
	rid := rerunOf(t, base, id, "", tenant).Get("id").String()
	waitJob(t, base+"/batch/"+rid, tenant, "completed")
	_, _, body := send(t, "GET", base+"/batch/"+rid+"/results", "", tenant)
	rs := mustJSON(t, body).Get("results").Array()
	if len(rs) != 2 || !slices.Equal(field(rs, "source_index"), []string{"0", "1"}) ||
		rs[1].Get("status").Int() != 200 || rs[1].Get("body.uri").String() != "/echo/2" {
		t.Errorf("a JSON batch's rerun, natively: %s", body)
	}

	id = submitAs(t, base+"/batch", `{"requests":[
		{"id":"1","method":"GET","url":"/slow?d=0s"},
		{"id":"2","method":"GET","url":"/limited?id=j3&n=1&status=500","atomicityGroup":"g"}]}`, tenant)
	waitJob(t, base+"/batch/"+id, tenant, "completed")
	status, _, body := send(t, "POST", base+"/batch/"+id+"/retry", "", tenant)
	if status != 422 || !strings.Contains(body, `"index":1,"id":"2","message":"it belongs to atomicityGroup \"g\"`) {
		t.Errorf("rerun of an atomicity group: %d %s", status, body)
	}
}

// A rerun stopped mid-way resumes where it was, its results still
// saying which operation of the original each reruns.
func TestRerunResumes(t *testing.T) {
	be := newBackend(t)
	storage := t.TempDir()
	port := freePort(t)
	cfgJSON := adapt(t, testCaddyfile(storage, port, "", proxySite(be, `{
		op_timeout 100ms
		async {
			credentials_key `+testKey+`
			lease 1s
		}
	}`)))
	base := loadCaddy(t, cfgJSON, port)
	const n = 24
	var sb strings.Builder
	var all []string
	for i := range n {
		fmt.Fprintf(&sb, `{"path":"/slow?id=r%d&d=1s"}`+"\n", i) // each fails, after op_timeout
		all = append(all, fmt.Sprint(i))
	}
	status, resp := sendNDJSON(t, base+"/batch", sb.String())
	if status != 202 {
		t.Fatalf("%d %s", status, resp)
	}
	id := mustJSON(t, resp).Get("id").String()
	waitJob(t, base+"/batch/"+id, alice, "completed")
	rid := rerunOf(t, base, id, "", alice).Get("id").String()
	eventually(t, 10*time.Second, "some of the rerun to run", func() bool { return len(be.requests()) >= n+8 })
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	stoppedAt := len(be.requests())
	base = loadCaddy(t, cfgJSON, port)
	p := waitJob(t, base+"/batch/"+rid, alice, "completed")
	if stoppedAt >= 2*n || p.Get("failed").Int() != n || p.Get("retry_of").String() != id {
		t.Fatalf("the restart did not fall mid-rerun (%d requests): %s", stoppedAt, p.Raw)
	}
	if got := field(results(t, base, rid, alice), "source_index"); !slices.Equal(got, all) {
		t.Errorf("source_index across a restart: %v", got)
	}
}

// The rerun of a streamed job's many failures holds no more of them in
// memory than a part and a chunk: its intake reads the failures stream
// as it stores the new job's chunks. Every other operation fails, so
// that the rerun's ids are not its default ones. BATCH_RERUN_OPS sets
// how many operations the original has (figures in docs/async.md).
func TestRerunOfManyFailuresMemory(t *testing.T) {
	total := 40_000
	if v, err := strconv.Atoi(os.Getenv("BATCH_RERUN_OPS")); err == nil {
		total = v
	}
	n := total / 2 // failures
	base := startCaddy(t, `
	batch /batch /batch/* {
		mode parallel
		concurrency 16
		async {
			retention 1h
		}
	}
	respond /nope 500
	respond /yes 200`)
	pad := strings.Repeat("x", min(1000, 100_000_000/n)) // 20 MB of requests to rerun, at most 100 MB
	var sb strings.Builder
	for range n {
		fmt.Fprintf(&sb, `{"method":"POST","path":"/yes"}`+"\n"+`{"method":"POST","path":"/nope","body":{"pad":%q}}`+"\n", pad)
	}
	status, resp := sendNDJSON(t, base+"/batch", sb.String())
	if status != 202 {
		t.Fatalf("%d %s", status, resp)
	}
	sb = strings.Builder{}
	id := mustJSON(t, resp).Get("id").String()
	p := waitJobFor(t, 10*time.Minute, base+"/batch/"+id, alice, "completed")
	if p.Get("failed").Int() != int64(n) {
		t.Fatalf("original: %s", p.Raw)
	}

	before := liveHeap()
	var peak uint64
	stop, sampled := make(chan struct{}), make(chan struct{})
	go func() { // the live heap: garbage would hide what is held
		defer close(sampled)
		for {
			select {
			case <-stop:
				return
			case <-time.After(10 * time.Millisecond):
				peak = max(peak, liveHeap())
			}
		}
	}()
	start := time.Now()
	status, _, resp = send(t, "POST", base+"/batch/"+id+"/retry", "", alice)
	took := time.Since(start)
	close(stop)
	receive(t, 5*time.Second, "the heap sampler to stop", sampled)
	if status != 202 || mustJSON(t, resp).Get("total").Int() != int64(n) {
		t.Fatalf("retry: %d %s", status, resp)
	}
	rid := mustJSON(t, resp).Get("id").String()
	if status, _, resp := send(t, "DELETE", base+"/batch/"+rid, "", alice); status >= 300 && status != 409 {
		t.Errorf("cancel: %d %s", status, resp)
	}
	growth := int64(peak) - int64(before)
	t.Logf("rerun of %d failures (%d MiB of requests) taken in %v; live heap grew %.1f MiB at its peak",
		n, n*len(pad)>>20, took.Round(time.Millisecond), float64(growth)/(1<<20))
	// Beside a part of failures and a chunk (1 MiB each), the intake
	// keeps 32 bytes per operation to find duplicate ids.
	if limit := int64(24<<20 + 32*n); growth > limit {
		t.Errorf("the heap grew %d MiB taking a rerun of %d failures, want at most %d MiB", growth>>20, n, limit>>20)
	}
	waitJobFor(t, 10*time.Minute, base+"/batch/"+rid, alice, "canceled", "completed") // the rest is skipped, and stored
}
