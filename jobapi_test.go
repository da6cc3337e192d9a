package batch

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/certmagic"
	"github.com/tidwall/gjson"
)

// Results stored as one part per chunk (as before parts existed) still
// read, whole and paged.
func TestAsyncResultsOfSinglePartChunks(t *testing.T) {
	storage := t.TempDir()
	id := "0123456789abcdef0123456789abcdef"
	sum := sha256.Sum256([]byte("caddy-batch owner\x00Bearer alice"))
	created := time.Now()
	rec, _ := json.Marshal(jobRecord{
		progress: progress{ID: id, Status: stateCompleted, Total: 150, Completed: 150, Succeeded: 150,
			CreatedAt: created, CompletedAt: &created},
		Outcome: "completed", Owner: hex.EncodeToString(sum[:]), ExpiresAt: created.Add(time.Hour),
	})
	chunk := func(from, to int) []byte {
		var items []string
		for i := from; i < to; i++ {
			items = append(items, fmt.Sprintf(`{"id":"%d","status":200,"body":{"n":[%d,"a,b]"]}}`, i, i))
		}
		return []byte(strings.Join(items, ","))
	}
	fsys := &certmagic.FileStorage{Path: storage}
	for k, v := range map[string][]byte{
		jobKey(id, "job"):               rec,
		jobKey(id, "results", "000000"): chunk(0, 100),
		jobKey(id, "results", "000001"): chunk(100, 150),
	} {
		if err := fsys.Store(context.Background(), k, v); err != nil {
			t.Fatal(err)
		}
	}
	base := startCaddy(t, "batch /batch /batch/* {\n\tasync\n}\nrespond 404", inStorage(storage))
	_, _, body := send(t, "GET", base+"/batch/"+id+"/results", "", alice)
	all := mustJSON(t, body).Get("results").Array()
	if len(all) != 150 || all[149].Get("id").String() != "149" || all[99].Get("body.n.1").String() != "a,b]" {
		t.Fatalf("results: %d, %.300s", len(all), body)
	}
	_, _, body = send(t, "GET", base+"/batch/"+id+"/results?offset=98&limit=4", "", alice)
	page := mustJSON(t, body).Get("results").Array()
	if len(page) != 4 || page[0].Get("id").String() != "98" || page[3].Get("id").String() != "101" {
		t.Errorf("page 98+4: %s", body)
	}
}

// Pages across chunk and part boundaries of a job whose answers are of
// mixed sizes read the same results as the whole.
func TestAsyncResultsPagesAcrossParts(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, asyncSite(be, ""))
	var ops []string
	for i := range 230 {
		if i%10 == 3 {
			ops = append(ops, fmt.Sprintf(`{"id":"o%d","path":"/big?n=400000"}`, i))
		} else {
			ops = append(ops, fmt.Sprintf(`{"id":"o%d","path":"/health"}`, i))
		}
	}
	id := submitJob(t, base+"/batch", "["+strings.Join(ops, ",")+"]")
	waitJob(t, base+"/batch/"+id, alice, "completed")
	_, _, body := send(t, "GET", base+"/batch/"+id+"/results", "", alice)
	all := mustJSON(t, body).Get("results").Array()
	if len(all) != 230 {
		t.Fatalf("%d results", len(all))
	}
	for _, off := range []int{0, 2, 3, 4, 95, 99, 100, 101, 197, 225, 229, 230, 500} {
		_, _, body := send(t, "GET", fmt.Sprintf("%s/batch/%s/results?offset=%d&limit=7", base, id, off), "", alice)
		page := mustJSON(t, body).Get("results").Array()
		if want := max(0, min(7, 230-off)); len(page) != want {
			t.Fatalf("offset %d: %d results, want %d", off, len(page), want)
		}
		for k, r := range page {
			if r.Raw != all[off+k].Raw {
				t.Fatalf("offset %d, result %d: %.100s, want %.100s", off, k, r.Raw, all[off+k].Raw)
			}
		}
	}
}

// Past max_queued, a job is refused with 503 and Retry-After before
// anything is stored, and refused jobs cost no memory.
func TestAsyncQueueBounded(t *testing.T) {
	be := newBackend(t)
	storage := t.TempDir()
	base := startCaddy(t, asyncSite(be, "max_queued 3"), inStorage(storage))
	var queued []string
	t.Cleanup(func() {
		// Nothing is left for the shutdown to wait for: the queued jobs
		// are canceled, then the blockers let go.
		for _, id := range queued {
			if status, _, body := send(t, "DELETE", base+"/batch/"+id, "", alice); status != 200 {
				t.Errorf("cancel of a queued job: %d %s", status, body)
			}
		}
		be.release()
	})
	for i := range 2 { // both workers busy
		submitJob(t, base+"/batch", fmt.Sprintf(`[{"path":"/hold?id=block%d"}]`, i))
	}
	eventually(t, 10*time.Second, "both blockers running", func() bool {
		b := be.eventLog()
		return len(b) >= 2
	})

	// ~1 MB each: 1000 operations with bodies of 1 KB.
	var ops []string
	for i := range 1000 {
		ops = append(ops, fmt.Sprintf(`{"method":"POST","path":"/echo","body":{"n":%d,"pad":"%s"}}`, i, strings.Repeat("p", 1000)))
	}
	job := "[" + strings.Join(ops, ",") + "]"
	before := liveHeap()
	accepted, refused := 0, 0
	for range 30 {
		status, hdr, body := send(t, "POST", base+"/batch", job, alice, "Prefer: respond-async")
		switch status {
		case 202:
			accepted++
			queued = append(queued, mustJSON(t, body).Get("id").String())
		case 503:
			refused++
			if hdr.Get("Retry-After") == "" || !strings.Contains(mustJSON(t, body).Get("error").String(), "queue") {
				t.Errorf("refusal: %v %s", hdr, body)
			}
		default:
			t.Fatalf("submit: %d %s", status, body)
		}
	}
	growth := int64(liveHeap()) - int64(before)
	t.Logf("30 jobs of %d bytes sent, %d queued: live heap grew %.1f MiB", len(job), accepted, float64(growth)/(1<<20))
	if accepted != 3 || refused != 27 {
		t.Errorf("accepted %d, refused %d; want 3 and 27", accepted, refused)
	}
	if growth > 20<<20 {
		t.Errorf("live heap grew %d MiB with 3 jobs queued", growth>>20)
	}
	dirs, _ := os.ReadDir(filepath.Join(storage, "batch", "jobs"))
	if len(dirs) != 5 {
		t.Errorf("%d jobs stored, want 5", len(dirs))
	}
	// A refusal is not stored as an Idempotency-Key's answer: the key is
	// not spent.
	status, _, body := send(t, "POST", base+"/batch", `[{"path":"/health"}]`, alice, "Prefer: respond-async", "Idempotency-Key: k1")
	if status != 503 {
		t.Fatalf("idempotent submit to a full queue: %d %s", status, body)
	}
	if status, hdr, body := send(t, "POST", base+"/batch", `[{"path":"/health"}]`, alice, "Prefer: respond-async", "Idempotency-Key: k1"); status != 503 || hdr.Get("Idempotent-Replayed") != "" {
		t.Errorf("refusal was stored as the key's answer: %d %v %s", status, hdr, body)
	}
}

func TestAsyncMaxQueuedConfig(t *testing.T) {
	t.Parallel()
	for _, bad := range []string{"max_queued 0", "max_queued -1", "max_queued x", "max_queued", "max_queued 1 2"} {
		d := caddyfile.NewTestDispenser("batch {\n\tasync {\n\t\t" + bad + "\n\t}\n}")
		err := new(Handler).UnmarshalCaddyfile(d)
		if err == nil || !strings.Contains(err.Error(), "Testfile:3") {
			t.Errorf("%q: %v", bad, err)
		}
	}
	h := new(Handler)
	if err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser("batch {\n\tasync {\n\t\tmax_queued 7\n\t}\n}")); err != nil {
		t.Fatal(err)
	}
	cfg, _ := json.Marshal(h)
	if got := gjson.GetBytes(cfg, "async.max_queued").Int(); got != 7 {
		t.Errorf("max_queued 7 gives %s", cfg)
	}
	h = &Handler{Async: &AsyncConfig{MaxQueued: -1}}
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	if err := h.Provision(ctx); err == nil {
		t.Error("max_queued -1 was taken")
	}
}

func TestAsyncSubmitPollResults(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, asyncSite(be, ""))

	var ops []string
	for i := range 250 {
		ops = append(ops, fmt.Sprintf(`{"id":"u%d","method":"POST","path":"/users","body":{"name":"user %d"}}`, i, i))
	}
	status, hdr, body := send(t, "POST", base+"/batch", "["+strings.Join(ops, ",")+"]", alice, "Prefer: respond-async")
	if status != 202 {
		t.Fatalf("submit: %d %s", status, body)
	}
	p := mustJSON(t, body)
	id := p.Get("id").String()
	if len(id) != 32 || p.Get("status").String() != "queued" || p.Get("total").Int() != 250 ||
		p.Get("completed").Int() != 0 || p.Get("created_at").String() == "" {
		t.Errorf("submit answer: %s", body)
	}
	if hdr.Get("Location") != "/batch/"+id || hdr.Get("Preference-Applied") != "respond-async" {
		t.Errorf("Location %q Preference-Applied %q", hdr.Get("Location"), hdr.Get("Preference-Applied"))
	}

	p = waitJob(t, base+"/batch/"+id, alice, "completed")
	if p.Get("completed").Int() != 250 || p.Get("succeeded").Int() != 250 || p.Get("completed_at").String() == "" {
		t.Errorf("final progress: %s", p.Raw)
	}
	status, _, body = send(t, "GET", base+"/batch/"+id+"/results", "", alice)
	res := mustJSON(t, body)
	if status != 200 || res.Get("status").String() != "completed" || len(res.Get("results").Array()) != 250 {
		t.Fatalf("results: %d %.300s", status, body)
	}
	for i, r := range res.Get("results").Array() {
		if r.Get("id").String() != fmt.Sprintf("u%d", i) || r.Get("body.name").String() != fmt.Sprintf("user %d", i) {
			t.Fatalf("result %d out of place: %s", i, r.Raw)
		}
	}
	// A page across a chunk boundary.
	_, _, body = send(t, "GET", base+"/batch/"+id+"/results?offset=95&limit=10", "", alice)
	page := mustJSON(t, body).Get("results").Array()
	if len(page) != 10 || page[0].Get("id").String() != "u95" || page[9].Get("id").String() != "u104" {
		t.Errorf("page 95+10: %s", body)
	}
	if be.API.Len() != 250 {
		t.Errorf("backend holds %d users", be.API.Len())
	}

	// "async": true in the envelope, with no Prefer header, is async too.
	status, _, body = send(t, "POST", base+"/batch", `{"async":true,"batch":[{"path":"/health"}]}`, alice)
	if status != 202 {
		t.Errorf("envelope async: %d %s", status, body)
	}
	waitJob(t, base+"/batch/"+mustJSON(t, body).Get("id").String(), alice, "completed")
}

func TestAsyncAccess(t *testing.T) {
	be := newBackend(t)
	storage := t.TempDir()
	base := startCaddy(t, asyncSite(be, ""), inStorage(storage))
	status, _, body := send(t, "POST", base+"/batch", `[{"path":"/slow?d=300ms"}]`, alice, "Prefer: respond-async")
	if status != 202 {
		t.Fatalf("submit: %d %s", status, body)
	}
	job := base + "/batch/" + mustJSON(t, body).Get("id").String()

	// Before the end, the results final so far: none yet, more to come.
	if status, _, body := send(t, "GET", job+"/results", "", alice); status != 200 || mustJSON(t, body).Get("complete").Bool() ||
		mustJSON(t, body).Get("next").Int() != 0 || mustJSON(t, body).Get("results.#").Int() != 0 {
		t.Errorf("results before the end: %d %s", status, body)
	}
	// Another owner does not see the job; no owner at all is refused.
	for who, want := range map[string]int{"Authorization: Bearer mallory": 404, "": 401} {
		if status, _, _ := send(t, "GET", job, "", who); status != want {
			t.Errorf("progress for %q: %d, want %d", who, status, want)
		}
		if status, _, _ := send(t, "GET", job+"/results", "", who); status != want {
			t.Errorf("results for %q: %d, want %d", who, status, want)
		}
		if status, _, _ := send(t, "DELETE", job, "", who); status != want {
			t.Errorf("cancel for %q: %d, want %d", who, status, want)
		}
	}
	if status, _, _ := send(t, "GET", base+"/batch/0123456789abcdef0123456789abcdef", "", alice); status != 404 {
		t.Errorf("unknown id: %d", status)
	}
	if status, hdr, _ := send(t, "PUT", job, ""); status != 405 || hdr.Get("Allow") != "GET, DELETE" {
		t.Errorf("PUT on a job: %d Allow %q", status, hdr.Get("Allow"))
	}
	waitJob(t, job, alice, "completed")
	if status, _, _ := send(t, "DELETE", job, "", alice); status != 409 {
		t.Errorf("cancel of an ended job: %d", status)
	}
	for _, r := range be.requests() {
		if r.Header.Get("Authorization") != "Bearer alice" {
			t.Errorf("operation did not inherit the submitter's credentials: %v", r.Header)
		}
	}
	// Storage holds a hash of the owner's credentials, never the credentials.
	var files int
	err := filepath.WalkDir(storage, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		files++
		if b, _ := os.ReadFile(p); strings.Contains(string(b), "alice") {
			t.Errorf("%s holds the owner's credentials: %s", p, b)
		}
		return nil
	})
	if err != nil || files == 0 {
		t.Errorf("walking storage: %v, %d files", err, files)
	}
}

func TestAsyncCancel(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, asyncSite(be, ""))
	var ops []string
	for i := range 30 {
		ops = append(ops, fmt.Sprintf(`{"path":"/slow?id=%d&d=50ms"}`, i))
	}
	_, _, body := send(t, "POST", base+"/batch", "["+strings.Join(ops, ",")+"]", alice, "Prefer: respond-async")
	job := base + "/batch/" + mustJSON(t, body).Get("id").String()
	eventually(t, 10*time.Second, "the job under way", func() bool { return len(be.eventLog()) >= 4 })
	status, _, body := send(t, "DELETE", job, "", alice)
	seenAtCancel := len(be.requests())
	if status != 200 || mustJSON(t, body).Get("status").String() != "canceled" {
		t.Fatalf("cancel: %d %s", status, body)
	}
	time.Sleep(150 * time.Millisecond)
	if n := len(be.requests()); n != seenAtCancel {
		t.Errorf("backend saw %d operations after the cancel", n-seenAtCancel)
	}
	_, _, body = send(t, "GET", job+"/results", "", alice)
	res := mustJSON(t, body)
	last := res.Get("results.29")
	if last.Get("status").Int() != 424 || last.Get("error").String() != "skipped: batch canceled" {
		t.Errorf("unstarted op after cancel: %s", last.Raw)
	}
	if int(res.Get("skipped").Int()) != 30-seenAtCancel {
		t.Errorf("skipped %d, want %d: %s", res.Get("skipped").Int(), 30-seenAtCancel, body)
	}
}

// A request for a job that is not the caller's, or from no caller at all,
// leaves nothing behind in memory; the places jobs are submitted at, a
// Host and a path the client chooses, are kept up to a bound.
func TestJobPathsKeepNothingForStrangers(t *testing.T) {
	setVar(t, &maxEndpoints, 20)
	be := newBackend(t)
	base := startCaddy(t, asyncSite(be, ""))
	waitJob(t, base+"/batch/"+submitJob(t, base+"/batch", `[{"path":"/health"}]`), alice, "completed")
	p := thePool(t)
	endpoints := func() int {
		p.mu.Lock()
		defer p.mu.Unlock()
		return len(p.endpoints)
	}
	before := endpoints()
	for i := range 2000 {
		url := fmt.Sprintf("%s/batch/p%d/%032x", base, i, i)
		if status, _, body := send(t, "GET", url, ""); status != 401 {
			t.Fatalf("anonymous: %d %s", status, body)
		}
		if status, _, body := send(t, "GET", url+"/results", "", "Authorization: Bearer mallory"); status != 404 {
			t.Fatalf("a stranger: %d %s", status, body)
		}
	}
	if n := endpoints(); n != before {
		t.Errorf("requests for no job of theirs left %d endpoints, %d before", n, before)
	}
	for i := range 50 {
		status, _, body := send(t, "POST", fmt.Sprintf("%s/batch/p%d", base, i), `[{"path":"/health"}]`, alice, "Prefer: respond-async")
		if status != 202 {
			t.Fatalf("submit at /batch/p%d: %d %s", i, status, body)
		}
	}
	if n := endpoints(); n > 20 {
		t.Errorf("%d endpoints kept, more than the bound of 20", n)
	}
}

// Results that storage no longer holds as they were written are not served
// as if right: the reader gets a clear error, in every format.
func TestDamagedResultsRefused(t *testing.T) {
	be := newBackend(t)
	storage := t.TempDir()
	base := startCaddy(t, asyncSite(be, ""), inStorage(storage))
	submit := func(ctype, body string) string {
		status, _, answer := send(t, "POST", base+"/batch", body, alice, "Prefer: respond-async", "Content-Type: "+ctype)
		if status != 202 {
			t.Fatalf("submit: %d %s", status, answer)
		}
		id := mustJSON(t, answer).Get("id").String()
		waitJob(t, base+"/batch/"+id, alice, "completed")
		return id
	}
	jobs := map[string]string{
		"native":     submit("application/json", `[{"path":"/users"},{"path":"/text"}]`),
		"JSON batch": submit("application/json", `{"requests":[{"id":"a","method":"GET","url":"/users"},{"id":"b","method":"GET","url":"/text"}]}`),
		"multipart": submit("multipart/mixed; boundary=b", "--b\r\nContent-Type: application/http\r\n\r\nGET /users HTTP/1.1\r\n\r\n"+
			"--b\r\nContent-Type: application/http\r\n\r\nGET /text HTTP/1.1\r\n\r\n--b--\r\n"),
	}
	for name, id := range jobs {
		part := filepath.Join(storage, "batch", "jobs", id, "results", "000000")
		stored, err := os.ReadFile(part)
		if err != nil {
			t.Fatal(err)
		}
		// The second result loses its end, as a torn write leaves it.
		if err := os.WriteFile(part, stored[:len(stored)-5], 0o600); err != nil {
			t.Fatal(err)
		}
		for _, accept := range []string{"", "Accept: application/x-ndjson"} {
			status, _, body := send(t, "GET", base+"/batch/"+id+"/results", "", alice, accept)
			if status != 500 || !strings.Contains(body, "damaged") {
				t.Errorf("%s %s: %d %.300s", name, accept, status, body)
			}
		}
	}
}

// Two Caddy instances on one storage: either answers for a job the other runs.
func TestAsyncTwoInstancesShareStorage(t *testing.T) {
	setVar(t, &cancelPoll, 20*time.Millisecond) // A sees B's cancel soon
	be := newBackend(t)
	a, b, _ := twoCaddies(t, t.TempDir(), "batch /batch /batch/* {\n\tasync\n}\nreverse_proxy "+be.addr())

	// Submitted to A, followed and read on B.
	_, _, body := send(t, "POST", a+"/batch", `[{"path":"/slow?d=200ms"},{"path":"/health"}]`, alice, "Prefer: respond-async")
	id := mustJSON(t, body).Get("id").String()
	if status, _, body := send(t, "GET", b+"/batch/"+id, "", alice); status != 200 || !strings.Contains(body, id) {
		t.Fatalf("B does not see A's job: %d %s", status, body)
	}
	waitJob(t, b+"/batch/"+id, alice, "completed")
	_, _, body = send(t, "GET", b+"/batch/"+id+"/results", "", alice)
	if res := mustJSON(t, body); res.Get("results.1.body.status").String() != "ok" {
		t.Errorf("results through B: %s", body)
	}
	if status, _, _ := send(t, "GET", b+"/batch/"+id, "", "Authorization: Bearer mallory"); status != 404 {
		t.Errorf("B must check the owner too: %d", status)
	}

	// Canceled through B while A runs it.
	var ops []string
	for i := range 40 {
		ops = append(ops, fmt.Sprintf(`{"path":"/slow?id=c%d&d=50ms"}`, i))
	}
	_, _, body = send(t, "POST", a+"/batch", "["+strings.Join(ops, ",")+"]", alice, "Prefer: respond-async")
	id = mustJSON(t, body).Get("id").String()
	if status, _, body := send(t, "DELETE", b+"/batch/"+id, "", alice); status != 202 {
		t.Fatalf("cancel through B: %d %s", status, body)
	}
	p := waitJob(t, b+"/batch/"+id, alice, "canceled")
	if p.Get("skipped").Int() == 0 {
		t.Errorf("cancel through B skipped nothing: %s", p.Raw)
	}
}
