package batch

import (
	"bufio"
	"fmt"
	"io"
	"net/http"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tidwall/gjson"
)

func ndjsonSite(be *backend, async string) string {
	return proxySite(be, `{
		async {
			`+async+`
		}
	}`)
}

func sendNDJSON(t *testing.T, url, body string, headers ...string) (int, string) {
	t.Helper()
	status, _, resp := send(t, "POST", url, body, append([]string{alice, "Content-Type: application/x-ndjson"}, headers...)...)
	return status, resp
}

// storedJobs lists what storage holds of jobs: job directories, and the
// jobs queued and held.
func storedJobs(t *testing.T, storage string) []string {
	t.Helper()
	var found []string
	dirs := []string{"batch/jobs", queuePrefix}
	epochs, _ := os.ReadDir(filepath.Join(storage, heldPrefix))
	for _, e := range epochs {
		dirs = append(dirs, heldDir(e.Name()))
	}
	for _, dir := range dirs {
		entries, err := os.ReadDir(filepath.Join(storage, dir))
		if err != nil && !os.IsNotExist(err) {
			t.Fatal(err)
		}
		for _, e := range entries {
			if e.Name() != heartbeatName {
				found = append(found, dir+"/"+e.Name())
			}
		}
	}
	return found
}

// An NDJSON job: options on the first line, one operation per line, ids
// numbered on across the chunks it is stored in; its results stream back
// as NDJSON, one line each and a summary, and page as JSON.
func TestNDJSONJob(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, ndjsonSite(be, ""))
	var sb strings.Builder
	sb.WriteString(`{"mode":"parallel","omit_response_on_success":true}` + "\n")
	const n = 1500 // two chunks of operations
	for i := range n {
		fmt.Fprintf(&sb, `{"path":"/echo/%d"}`+"\n", i)
	}
	status, resp := sendNDJSON(t, base+"/batch", sb.String())
	if status != 202 {
		t.Fatalf("%d %s", status, resp)
	}
	id := mustJSON(t, resp).Get("id").String()
	p := waitJob(t, base+"/batch/"+id, alice, "completed", "error")
	if p.Get("succeeded").Int() != n || p.Get("started_at").String() == "" {
		t.Fatalf("NDJSON job: %s", p.Raw)
	}

	res, err := client.Do(request(t, "GET", base+"/batch/"+id+"/results", "", alice, "Accept: application/x-ndjson"))
	if err != nil {
		t.Fatal(err)
	}
	defer res.Body.Close()
	if ct := res.Header.Get("Content-Type"); ct != "application/x-ndjson" {
		t.Errorf("Content-Type %q", ct)
	}
	sc := bufio.NewScanner(res.Body)
	lines := 0
	var last gjson.Result
	for sc.Scan() {
		last = gjson.Parse(sc.Text())
		if last.Get("summary").Bool() {
			break
		}
		if last.Get("index").Int() != int64(lines) || last.Get("id").String() != fmt.Sprint(lines) || last.Get("status").Int() != 200 {
			t.Fatalf("line %d: %s", lines, sc.Text())
		}
		if last.Get("body").Exists() {
			t.Fatalf("omit_response_on_success from the options line not applied: %s", sc.Text())
		}
		lines++
	}
	if lines != n || last.Get("status").String() != "completed" || last.Get("succeeded").Int() != n {
		t.Errorf("%d result lines, then %s", lines, last.Raw)
	}
	_, _, body := send(t, "GET", base+"/batch/"+id+"/results?offset=1400&limit=100", "", alice)
	if r := mustJSON(t, body).Get("results"); len(r.Array()) != 100 || r.Get("99.id").String() != "1499" {
		t.Errorf("JSON page of an NDJSON job: %.300s", body)
	}
}

// A streamed batch is validated whole before anything runs: faults are
// listed with their lines, and nothing of it stays stored.
func TestNDJSONFaults(t *testing.T) {
	be := newBackend(t)
	storage := t.TempDir()
	base := startCaddy(t, ndjsonSite(be, ""), inStorage(storage))
	lines := []string{
		`{"id":"a","path":"/echo"}`,
		`{"id":"b","path":"/echo"`,
		`{"id":"c","path":"/echo","depends_on":["a"]}`,
		`{"id":"d","path":"/echo","body":{"name":"{{a.body.uri}}"}}`,
		`{"id":"a","path":"/echo"}`,
		`{"path":"/echo","method":"BREW"}`,
		`{"id":"1507","path":"/echo"}`,
		`{"path":"/echo"}`,
	}
	// Enough valid lines between that a chunk is stored before the faults
	// at the end are read.
	var sb strings.Builder
	for _, l := range lines[:1] {
		sb.WriteString(l + "\n")
	}
	for i := range 1500 {
		fmt.Fprintf(&sb, `{"id":"ok%d","path":"/echo"}`+"\n", i)
	}
	for _, l := range lines[1:] {
		sb.WriteString(l + "\n")
	}
	status, resp := sendNDJSON(t, base+"/batch", sb.String())
	if status != 400 {
		t.Fatalf("%d %s", status, resp)
	}
	msgs := []string{}
	for _, f := range mustJSON(t, resp).Get("errors").Array() {
		msgs = append(msgs, f.Get("message").String())
	}
	all := strings.Join(msgs, "\n")
	for _, want := range []string{
		"line 1502: operation is not valid JSON",
		"line 1503: depends_on needs the whole batch",
		"line 1504: references need the whole batch",
		"line 1506: method BREW is not allowed",
		"line 1505: id is already used by operation 0",
		"line 1507: id 1507 is the default id of operation 1507",
	} {
		if !strings.Contains(all, want) {
			t.Errorf("faults lack %q:\n%s", want, all)
		}
	}
	if len(be.requests()) != 0 {
		t.Errorf("an invalid batch ran %d operations", len(be.requests()))
	}
	if left := storedJobs(t, storage); len(left) != 0 {
		t.Errorf("an invalid batch left %v in storage", left)
	}
}

// A native batch larger than max_body_size, or with more operations than
// max_ops, is streamed when it asks to be async; the bulk form too, with
// its operation before its items.
func TestStreamedNativeBatches(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, `{
		max_body_size 4KB
		async {
			max_ops 5000
		}
	}`))
	var ops []string
	for i := range 400 {
		ops = append(ops, fmt.Sprintf(`{"path":"/echo/e%d"}`, i))
	}
	envelope := `{"batch":[` + strings.Join(ops, ",") + `],"mode":"parallel"}`
	if status, _, body := send(t, "POST", base+"/batch", envelope, alice); status != 413 {
		t.Errorf("a sync batch over max_body_size: %d %s", status, body)
	}
	id := submitJob(t, base+"/batch", envelope)
	if p := waitJob(t, base+"/batch/"+id, alice, "completed", "error"); p.Get("succeeded").Int() != 400 {
		t.Errorf("streamed envelope: %s", p.Raw)
	}

	var items []string
	for i := range 300 {
		items = append(items, fmt.Sprintf(`{"name":"user%d"}`, i))
	}
	bulk := `{"operation":{"method":"POST","path":"/echo/bulk"},"items":[` + strings.Join(items, ",") + `]}`
	id = submitJob(t, base+"/batch", bulk)
	if p := waitJob(t, base+"/batch/"+id, alice, "completed", "error"); p.Get("succeeded").Int() != 300 {
		t.Errorf("streamed bulk: %s", p.Raw)
	}
	posted := 0
	for _, r := range be.requests() {
		if r.Method == "POST" && r.Path == "/echo/bulk" && strings.HasPrefix(string(r.Body), `{"name":"user`) {
			posted++
		}
	}
	if posted != 300 {
		t.Errorf("the backend got %d of 300 bulk items", posted)
	}

	backwards := `{"items":[` + strings.Join(items, ",") + `],"operation":{"method":"POST","path":"/echo/bulk"}}`
	status, _, body := send(t, "POST", base+"/batch", backwards, alice, "Prefer: respond-async")
	if status != 400 || !strings.Contains(body, `"operation\" must come before \"items\"`) {
		t.Errorf("items before operation: %d %s", status, body)
	}
}

// The async block's limits bound a streamed job: too many operations or
// too large a body is 413, and nothing of it stays stored.
func TestStreamedLimits(t *testing.T) {
	be := newBackend(t)
	storage := t.TempDir()
	base := startCaddy(t, ndjsonSite(be, "max_ops 1500\n\t\t\tmax_body_size 64KB"), inStorage(storage))
	line := `{"path":"/echo"}` + "\n"
	if status, resp := sendNDJSON(t, base+"/batch", strings.Repeat(line, 1501)); status != 413 || !strings.Contains(resp, "1500") {
		t.Errorf("too many operations: %d %s", status, resp)
	}
	big := strings.Repeat(`{"path":"/echo","body":{"pad":"`+strings.Repeat("x", 1000)+`"}}`+"\n", 70)
	if status, resp := sendNDJSON(t, base+"/batch", big); status != 413 {
		t.Errorf("too large a body: %d %s", status, resp)
	}
	eventually(t, 5*time.Second, "refused jobs deleted", func() bool { return len(storedJobs(t, storage)) == 0 })
	if len(be.requests()) != 0 {
		t.Errorf("a refused job ran %d operations", len(be.requests()))
	}
}

// The progress of a running job says when it started, how fast it goes
// and when it should end.
func TestJobProgressRate(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, ndjsonSite(be, ""))
	var sb strings.Builder
	for i := range 100 { // a second at least: a rate needs one
		fmt.Fprintf(&sb, `{"path":"/slow?d=10ms&id=p%d"}`+"\n", i)
	}
	status, resp := sendNDJSON(t, base+"/batch", sb.String())
	if status != 202 {
		t.Fatalf("%d %s", status, resp)
	}
	id := mustJSON(t, resp).Get("id").String()
	var p gjson.Result
	eventually(t, 10*time.Second, "a rate in the progress", func() bool {
		_, _, body := send(t, "GET", base+"/batch/"+id, "", alice)
		p = mustJSON(t, body)
		return p.Get("operations_per_second").Float() > 0
	})
	rate := p.Get("operations_per_second").Float()
	eta, err := time.Parse(time.RFC3339Nano, p.Get("estimated_completion_at").String())
	started, err2 := time.Parse(time.RFC3339Nano, p.Get("started_at").String())
	if err != nil || err2 != nil || !eta.After(started) || rate > 200 {
		t.Errorf("progress while running (operations take 10 ms each, one at a time): %s", p.Raw)
	}
	p = waitJob(t, base+"/batch/"+id, alice, "completed")
	if p.Get("operations_per_second").Exists() || p.Get("estimated_completion_at").Exists() {
		t.Errorf("an ended job still estimates: %s", p.Raw)
	}
}

// A streamed job sent with an Idempotency-Key is queued once: the same key
// and body replay its answer, another body is refused, and neither leaves
// anything stored.
func TestStreamedIdempotent(t *testing.T) {
	be := newBackend(t)
	storage := t.TempDir()
	base := startCaddy(t, ndjsonSite(be, ""), inStorage(storage))
	body := strings.Repeat(`{"path":"/echo"}`+"\n", 150)
	status, first := sendNDJSON(t, base+"/batch", body, "Idempotency-Key: import-1")
	if status != 202 {
		t.Fatalf("%d %s", status, first)
	}
	id := mustJSON(t, first).Get("id").String()
	waitJob(t, base+"/batch/"+id, alice, "completed")
	// Ended, the job is no longer held a moment later.
	eventually(t, 5*time.Second, "the job no longer held", func() bool {
		return !slices.ContainsFunc(storedJobs(t, storage), func(k string) bool {
			return strings.HasPrefix(k, heldPrefix+"/") && path.Base(k) == id
		})
	})
	jobs := len(storedJobs(t, storage))
	status, again := sendNDJSON(t, base+"/batch", body, "Idempotency-Key: import-1")
	if status != 202 || mustJSON(t, again).Get("id").String() != id {
		t.Errorf("the same key and body: %d %s, want the first answer (job %s)", status, again, id)
	}
	if status, resp := sendNDJSON(t, base+"/batch", body+`{"path":"/echo"}`+"\n", "Idempotency-Key: import-1"); status != 422 {
		t.Errorf("the same key, another body: %d %s", status, resp)
	}
	if n := len(storedJobs(t, storage)); n != jobs {
		t.Errorf("replays left %d more stored", n-jobs)
	}
	if n := len(be.requests()); n != 150 {
		t.Errorf("the backend saw %d operations for one job of 150", n)
	}
}

// Uploads that take their time hold no place in the async queue: another
// owner's batch is taken while they send; an upload that sends nothing
// for too long is ended (408) and nothing of it stays.
func TestSlowUploadsHoldNoQueuePlace(t *testing.T) {
	setVar(t, &intakeIdle, 400*time.Millisecond)
	be := newBackend(t)
	storage := t.TempDir()
	base := startCaddy(t, ndjsonSite(be, "max_queued 2"), inStorage(storage))
	type upload struct {
		pw     *io.PipeWriter
		status chan int
	}
	start := func(auth string) upload {
		pr, pw := io.Pipe()
		u := upload{pw: pw, status: make(chan int, 1)}
		req, _ := http.NewRequest(http.MethodPost, base+"/batch", pr)
		req.Header.Set("Content-Type", "application/x-ndjson")
		req.Header.Set("Authorization", auth)
		go func() {
			resp, err := client.Do(req)
			if err != nil {
				u.status <- 0
				return
			}
			resp.Body.Close()
			u.status <- resp.StatusCode
		}()
		_, _ = io.WriteString(pw, `{"path":"/health"}`+"\n")
		return u
	}
	var ups []upload
	for i := range 4 {
		ups = append(ups, start(fmt.Sprintf("Bearer uploader-%d", i)))
	}
	// They trickle a space now and then: never idle, never done.
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for _, u := range ups[:2] {
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				case <-time.After(100 * time.Millisecond):
					if _, err := io.WriteString(u.pw, " "); err != nil {
						return
					}
				}
			}
		})
	}
	time.Sleep(200 * time.Millisecond)
	for i := range 2 {
		status, _, body := send(t, "POST", base+"/batch", `[{"path":"/health"}]`, "Authorization: Bearer someone-else", "Prefer: respond-async")
		if status != 202 {
			t.Fatalf("batch %d of another owner while uploads go on: %d %s", i, status, body)
		}
	}
	// The two that went silent are ended.
	for _, u := range ups[2:] {
		select {
		case s := <-u.status:
			if s != 408 {
				t.Errorf("a silent upload answered %d, want 408", s)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("a silent upload never ended")
		}
	}
	close(stop)
	wg.Wait()
	for _, u := range ups[:2] {
		u.pw.Close() // the body ends: each is a job of one operation
		select {
		case s := <-u.status:
			if s != 202 && s != 503 {
				t.Errorf("an upload ended: %d", s)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("an upload never answered")
		}
	}
}

// A streamed job's options in the query are read whole, as a CSV batch's
// are: "50,000" is refused, not read as 50, and a parameter given twice
// is refused, not taken at its first value.
func TestStreamedQueryOptionsReadWhole(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, asyncSite(be, ""))
	for _, c := range []struct{ query, want string }{
		{"?max_failures=50,000", `got "50,000"`},
		{"?max_failure_rate=0.5,1", `got "0.5,1"`},
		{"?max_failures=5&max_failures=0", `"max_failures" given twice`},
		{"?key_concurrency=2x", `got "2x"`},
	} {
		status, _, body := send(t, "POST", base+"/batch"+c.query, "{\"path\":\"/health\"}\n", alice, "Content-Type: application/x-ndjson")
		if msg := mustJSON(t, body).Get("errors.0.message").String(); status != 400 || !strings.Contains(msg, c.want) {
			t.Errorf("NDJSON %s: %d %s, want 400 saying %s", c.query, status, body, c.want)
		}
	}
	if status, _, body := send(t, "POST", base+"/batch?max_failures=50&max_failure_rate=0.5", "{\"path\":\"/health\"}\n", alice,
		"Content-Type: application/x-ndjson"); status != 202 {
		t.Errorf("NDJSON with a budget in its query: %d %s", status, body)
	}
}

// A streamed CSV batch's query is read once, as its operation and its
// options: dry_run is refused as in any streamed batch (it queued a real
// job), and a parameter given twice is one fault, not two.
func TestStreamedCSVQueryReadOnce(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, asyncSite(be, ""))
	const csv = "id\n1\n2\n"
	for _, c := range []struct{ query, want string }{
		{"&dry_run=true", "dry_run takes a batch of at most"},
		{"&max_failures=5&max_failures=6", `"max_failures" given twice`},
		{"&metadata.a=1&metadata.a=2", "metadata"},
	} {
		status, _, body := send(t, "POST", base+"/batch?method=GET&path=/health"+c.query, csv, alice,
			"Content-Type: text/csv", "Prefer: respond-async")
		errs := mustJSON(t, body).Get("errors").Array()
		if status != 400 || len(errs) != 1 || !strings.Contains(errs[0].Get("message").String(), c.want) {
			t.Errorf("CSV job %s: %d %s, want 400 with one fault saying %s", c.query, status, body, c.want)
		}
	}
	status, _, body := send(t, "POST", base+"/batch?method=GET&path=/health&mode=parallel&max_failures=5&metadata.src=crm", csv, alice,
		"Content-Type: text/csv", "Prefer: respond-async")
	if status != 202 {
		t.Fatalf("CSV job: %d %s", status, body)
	}
	p := waitJob(t, base+"/batch/"+mustJSON(t, body).Get("id").String(), alice, stateCompleted)
	if p.Get("succeeded").Int() != 2 || p.Get("metadata.src").String() != "crm" {
		t.Errorf("CSV job with options: %s", p.Raw)
	}
}
