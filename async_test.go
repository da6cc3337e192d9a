package batch

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/tidwall/gjson"
)

// A test binary started with BATCH_TEST_CHILD set runs that Caddyfile as a
// second Caddy instance until killed: Caddy is one per process, and the
// cluster test needs two sharing one storage.
func TestMain(m *testing.M) {
	if cfg := os.Getenv("BATCH_TEST_CHILD"); cfg != "" {
		cfgJSON, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(cfg), nil)
		if err == nil {
			err = caddy.Load(cfgJSON, true)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		select {}
	}
	os.Exit(m.Run())
}

// startChildCaddy runs a second Caddy instance in a child process with the
// given full Caddyfile and waits until it listens on port.
func startChildCaddy(t *testing.T, cfg string, port int) string {
	t.Helper()
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), "BATCH_TEST_CHILD="+cfg)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	base := fmt.Sprintf("http://127.0.0.1:%d", port)
	for i := 0; ; i++ {
		if resp, err := http.Get(base + "/"); err == nil {
			resp.Body.Close()
			return base
		}
		if i == 200 {
			t.Fatalf("child caddy is not listening on %d", port)
		}
		time.Sleep(25 * time.Millisecond)
	}
}

func get(t *testing.T, url string, headers ...string) (int, http.Header, string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, url, nil)
	for _, h := range headers {
		if h == "" {
			continue
		}
		name, value, _ := strings.Cut(h, ":")
		req.Header.Set(name, strings.TrimSpace(value))
	}
	return do(t, req)
}

func del(t *testing.T, url string, headers ...string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest(http.MethodDelete, url, nil)
	for _, h := range headers {
		if h == "" {
			continue
		}
		name, value, _ := strings.Cut(h, ":")
		req.Header.Set(name, strings.TrimSpace(value))
	}
	status, _, body := do(t, req)
	return status, body
}

// waitJob polls a job until its status is one of want.
func waitJob(t *testing.T, url string, auth string, want ...string) gjson.Result {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		status, _, body := get(t, url, auth)
		if status != 200 {
			t.Fatalf("progress: %d %s", status, body)
		}
		p := mustJSON(t, body)
		for _, w := range want {
			if p.Get("status").String() == w {
				return p
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("job still %s, want %v: %s", p.Get("status"), want, body)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func asyncSite(b *backend, async string) string {
	return proxySite(b, `{
		max_ops 10000
		async {
			retention 1h
			workers 2
`+async+`
		}
	}`)
}

const alice = "Authorization: Bearer alice"

func TestAsyncSubmitPollResults(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, asyncSite(be, ""))

	var ops []string
	for i := range 250 {
		ops = append(ops, fmt.Sprintf(`{"id":"u%d","method":"POST","path":"/users","body":{"name":"user %d"}}`, i, i))
	}
	status, hdr, body := post(t, base+"/batch", "["+strings.Join(ops, ",")+"]", alice, "Prefer: respond-async")
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
	status, _, body = get(t, base+"/batch/"+id+"/results", alice)
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
	_, _, body = get(t, base+"/batch/"+id+"/results?offset=95&limit=10", alice)
	page := mustJSON(t, body).Get("results").Array()
	if len(page) != 10 || page[0].Get("id").String() != "u95" || page[9].Get("id").String() != "u104" {
		t.Errorf("page 95+10: %s", body)
	}
	if be.API.Len() != 250 {
		t.Errorf("backend holds %d users", be.API.Len())
	}

	// "async": true in the envelope, with no Prefer header, is async too.
	status, _, body = post(t, base+"/batch", `{"async":true,"batch":[{"path":"/health"}]}`, alice)
	if status != 202 {
		t.Errorf("envelope async: %d %s", status, body)
	}
	waitJob(t, base+"/batch/"+mustJSON(t, body).Get("id").String(), alice, "completed")
}

func TestAsyncAccess(t *testing.T) {
	be := newBackend(t)
	storage := t.TempDir()
	base := startCaddyIn(t, storage, asyncSite(be, ""))
	status, _, body := post(t, base+"/batch", `[{"path":"/slow?d=300ms"}]`, alice, "Prefer: respond-async")
	if status != 202 {
		t.Fatalf("submit: %d %s", status, body)
	}
	job := base + "/batch/" + mustJSON(t, body).Get("id").String()

	if status, _, body := get(t, job+"/results", alice); status != 409 || mustJSON(t, body).Get("status").String() == "" {
		t.Errorf("results before the end: %d %s", status, body)
	}
	// Another owner does not see the job; no owner at all is refused.
	for who, want := range map[string]int{"Authorization: Bearer mallory": 404, "": 401} {
		if status, _, _ := get(t, job, who); status != want {
			t.Errorf("progress for %q: %d, want %d", who, status, want)
		}
		if status, _, _ := get(t, job+"/results", who); status != want {
			t.Errorf("results for %q: %d, want %d", who, status, want)
		}
		if status, _ := del(t, job, who); status != want {
			t.Errorf("cancel for %q: %d, want %d", who, status, want)
		}
	}
	if status, _, _ := get(t, base+"/batch/0123456789abcdef0123456789abcdef", alice); status != 404 {
		t.Errorf("unknown id: %d", status)
	}
	req, _ := http.NewRequest(http.MethodPut, job, nil)
	if status, hdr, _ := do(t, req); status != 405 || hdr.Get("Allow") != "GET, DELETE" {
		t.Errorf("PUT on a job: %d Allow %q", status, hdr.Get("Allow"))
	}
	waitJob(t, job, alice, "completed")
	if status, _ := del(t, job, alice); status != 409 {
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
	_, _, body := post(t, base+"/batch", "["+strings.Join(ops, ",")+"]", alice, "Prefer: respond-async")
	job := base + "/batch/" + mustJSON(t, body).Get("id").String()
	for len(be.eventLog()) < 4 {
		time.Sleep(5 * time.Millisecond)
	}
	status, body := del(t, job, alice)
	seenAtCancel := len(be.requests())
	if status != 200 || mustJSON(t, body).Get("status").String() != "canceled" {
		t.Fatalf("cancel: %d %s", status, body)
	}
	time.Sleep(150 * time.Millisecond)
	if n := len(be.requests()); n != seenAtCancel {
		t.Errorf("backend saw %d operations after the cancel", n-seenAtCancel)
	}
	_, _, body = get(t, job+"/results", alice)
	res := mustJSON(t, body)
	last := res.Get("results.29")
	if last.Get("status").Int() != 424 || last.Get("error").String() != "skipped: batch canceled" {
		t.Errorf("unstarted op after cancel: %s", last.Raw)
	}
	if int(res.Get("skipped").Int()) != 30-seenAtCancel {
		t.Errorf("skipped %d, want %d: %s", res.Get("skipped").Int(), 30-seenAtCancel, body)
	}
}

// Two Caddy instances on one storage: either answers for a job the other runs.
func TestAsyncTwoInstancesShareStorage(t *testing.T) {
	be := newBackend(t)
	storage := t.TempDir()
	site := func(port int) string {
		return testCaddyfile(storage, port, "", "batch /batch /batch/* {\n\tasync\n}\nreverse_proxy "+be.addr())
	}
	portA, portB := freePort(t), freePort(t)
	a := loadCaddy(t, adapt(t, site(portA)), portA)
	b := startChildCaddy(t, site(portB), portB)

	// Submitted to A, followed and read on B.
	_, _, body := post(t, a+"/batch", `[{"path":"/slow?d=200ms"},{"path":"/health"}]`, alice, "Prefer: respond-async")
	id := mustJSON(t, body).Get("id").String()
	if status, _, body := get(t, b+"/batch/"+id, alice); status != 200 || !strings.Contains(body, id) {
		t.Fatalf("B does not see A's job: %d %s", status, body)
	}
	waitJob(t, b+"/batch/"+id, alice, "completed")
	_, _, body = get(t, b+"/batch/"+id+"/results", alice)
	if res := mustJSON(t, body); res.Get("results.1.body.status").String() != "ok" {
		t.Errorf("results through B: %s", body)
	}
	if status, _, _ := get(t, b+"/batch/"+id, "Authorization: Bearer mallory"); status != 404 {
		t.Errorf("B must check the owner too: %d", status)
	}

	// Canceled through B while A runs it.
	var ops []string
	for i := range 40 {
		ops = append(ops, fmt.Sprintf(`{"path":"/slow?id=c%d&d=50ms"}`, i))
	}
	_, _, body = post(t, a+"/batch", "["+strings.Join(ops, ",")+"]", alice, "Prefer: respond-async")
	id = mustJSON(t, body).Get("id").String()
	if status, body := del(t, b+"/batch/"+id, alice); status != 202 {
		t.Fatalf("cancel through B: %d %s", status, body)
	}
	p := waitJob(t, b+"/batch/"+id, alice, "canceled")
	if p.Get("skipped").Int() == 0 {
		t.Errorf("cancel through B skipped nothing: %s", p.Raw)
	}
}

func TestAsyncWebhookSignedAndRetried(t *testing.T) {
	defer func(d time.Duration) { webhookBackoff = d }(webhookBackoff)
	webhookBackoff = 10 * time.Millisecond

	var mu sync.Mutex
	var deliveries []string
	var bad []string
	recv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		mu.Lock()
		defer mu.Unlock()
		if err := verifySignature("s3cret", r.Header.Get("Batch-Signature"), body, 5*time.Minute); err != nil {
			bad = append(bad, err.Error())
		}
		deliveries = append(deliveries, string(body))
		if len(deliveries) == 1 {
			w.WriteHeader(500) // the first attempt fails: it must be retried
		}
	}))
	defer recv.Close()

	be := newBackend(t)
	base := startCaddy(t, asyncSite(be, `
			webhook `+recv.URL+` {
				secret s3cret
			}`))
	_, _, body := post(t, base+"/batch", `[{"path":"/health"},{"path":"/users/404"}]`, alice, "Prefer: respond-async")
	id := mustJSON(t, body).Get("id").String()
	waitJob(t, base+"/batch/"+id, alice, "completed")
	deadline := time.Now().Add(5 * time.Second)
	for {
		mu.Lock()
		n := len(deliveries)
		mu.Unlock()
		if n >= 2 || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(deliveries) != 2 || len(bad) != 0 {
		t.Fatalf("deliveries %d, bad signatures %v", len(deliveries), bad)
	}
	ev := gjson.Parse(deliveries[1])
	if ev.Get("type").String() != "batch.completed" || ev.Get("batch.id").String() != id ||
		ev.Get("batch.succeeded").Int() != 1 || ev.Get("batch.failed").Int() != 1 {
		t.Errorf("event: %s", deliveries[1])
	}
	if err := verifySignature("wrong", sign("s3cret", time.Now().Unix(), []byte("x")), []byte("x"), time.Minute); err == nil {
		t.Error("a wrong secret must not verify")
	}
	if err := verifySignature("s3cret", sign("s3cret", time.Now().Add(-time.Hour).Unix(), []byte("x")), []byte("x"), 5*time.Minute); err == nil {
		t.Error("an old timestamp must not verify")
	}
}

// verifySignature is what a receiver does; the README shows the same code.
func verifySignature(secret, header string, body []byte, tolerance time.Duration) error {
	var ts, sig string
	for _, part := range strings.Split(header, ",") {
		k, v, _ := strings.Cut(part, "=")
		switch k {
		case "t":
			ts = v
		case "v1":
			sig = v
		}
	}
	t, err := strconv.ParseInt(ts, 10, 64)
	if err != nil {
		return fmt.Errorf("no timestamp in %q", header)
	}
	if age := time.Since(time.Unix(t, 0)); age > tolerance || age < -tolerance {
		return fmt.Errorf("timestamp too old: %s", age)
	}
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write([]byte(ts + "."))
	mac.Write(body)
	want, _ := hex.DecodeString(sig)
	if !hmac.Equal(mac.Sum(nil), want) {
		return fmt.Errorf("signature mismatch")
	}
	return nil
}

// A config reload while a job runs neither drops nor repeats its operations.
func TestAsyncSurvivesReload(t *testing.T) {
	be := newBackend(t)
	storage := t.TempDir()
	port := freePort(t)
	cfg := func(greeting string) []byte {
		return adapt(t, testCaddyfile(storage, port, "", fmt.Sprintf("batch /batch /batch/* {\n\tasync\n}\nrespond /hello %q\nreverse_proxy %s", greeting, be.addr())))
	}
	base := loadCaddy(t, cfg("one"), port)
	var ops []string
	for i := range 20 {
		ops = append(ops, fmt.Sprintf(`{"path":"/slow?id=r%d&d=20ms"}`, i))
	}
	_, _, body := post(t, base+"/batch", "["+strings.Join(ops, ",")+"]", alice, "Prefer: respond-async")
	id := mustJSON(t, body).Get("id").String()
	for len(be.eventLog()) < 4 {
		time.Sleep(5 * time.Millisecond)
	}
	if err := caddy.Load(cfg("two"), true); err != nil {
		t.Fatal(err)
	}
	if _, _, body := get(t, base+"/hello"); body != "two" {
		t.Fatalf("reload did not take: %q", body)
	}
	p := waitJob(t, base+"/batch/"+id, alice, "completed", "error")
	if p.Get("status").String() != "completed" || p.Get("succeeded").Int() != 20 {
		t.Errorf("job across a reload: %s", p.Raw)
	}
	counts := map[string]int{}
	for _, e := range be.eventLog() {
		counts[e]++
	}
	for i := range 20 {
		if n := counts[fmt.Sprintf("start r%d", i)]; n != 1 {
			t.Errorf("operation r%d ran %d times", i, n)
		}
	}
}

// Shutdown interrupts a running job: it ends "error"/"interrupted", keeps
// the results it has, and a restarted instance serves them.
func TestAsyncInterruptedByShutdown(t *testing.T) {
	be := newBackend(t)
	storage := t.TempDir()
	port := freePort(t)
	cfgJSON := adapt(t, testCaddyfile(storage, port, "", "batch /batch /batch/* {\n\tasync\n}\nreverse_proxy "+be.addr()))
	base := loadCaddy(t, cfgJSON, port)
	var ops []string
	for i := range 20 {
		ops = append(ops, fmt.Sprintf(`{"path":"/slow?id=s%d&d=30ms"}`, i))
	}
	_, _, body := post(t, base+"/batch", "["+strings.Join(ops, ",")+"]", alice, "Prefer: respond-async")
	id := mustJSON(t, body).Get("id").String()
	for len(be.eventLog()) < 4 {
		time.Sleep(5 * time.Millisecond)
	}
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	base = loadCaddy(t, cfgJSON, port)
	p := waitJob(t, base+"/batch/"+id, alice, "completed", "error")
	if p.Get("status").String() != "error" || p.Get("error").String() != "interrupted" {
		t.Errorf("after shutdown: %s", p.Raw)
	}
	_, _, body = get(t, base+"/batch/"+id+"/results", alice)
	res := mustJSON(t, body)
	if res.Get("results.0.status").Int() != 200 || res.Get("results.19.status").Int() != 503 {
		t.Errorf("results kept after interruption: %.400s", body)
	}
}

// A 10,000-operation job holds its results in storage, not in memory.
func TestAsyncLargeJobMemory(t *testing.T) {
	base := startCaddy(t, `
	batch /batch /batch/* {
		max_ops 10000
		max_body_size 4MB
		async
	}
	header /item/* Content-Type application/json
	respond /item/* `+"`"+`{"ok":true,"pad":"0123456789012345678901234567890123456789012345678901234567890123456789"}`+"`")
	var sb strings.Builder
	sb.WriteString("[")
	for i := range 10000 {
		if i > 0 {
			sb.WriteString(",")
		}
		fmt.Fprintf(&sb, `{"path":"/item/%d"}`, i)
	}
	sb.WriteString("]")

	runtime.GC()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)
	var peak uint64
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		var m runtime.MemStats
		for {
			select {
			case <-stop:
				return
			case <-time.After(5 * time.Millisecond):
				runtime.ReadMemStats(&m)
				peak = max(peak, m.HeapInuse)
			}
		}
	}()
	status, _, body := post(t, base+"/batch", sb.String(), alice, "Prefer: respond-async")
	if status != 202 {
		t.Fatalf("%d %s", status, body)
	}
	id := mustJSON(t, body).Get("id").String()
	p := waitJob(t, base+"/batch/"+id, alice, "completed")
	close(stop)
	<-sampled
	if p.Get("succeeded").Int() != 10000 {
		t.Fatalf("job: %s", p.Raw)
	}
	growth := int64(peak) - int64(before.HeapInuse)
	t.Logf("heap in use before %d MiB, peak %d MiB, growth %d MiB", before.HeapInuse>>20, peak>>20, growth>>20)
	// The results alone are ~1.5 MB encoded; the request body is ~0.2 MB.
	if growth > 64<<20 {
		t.Errorf("heap grew %d MiB running a 10,000-operation job", growth>>20)
	}
	_, _, body = get(t, base+"/batch/"+id+"/results?offset=9990", alice)
	if r := mustJSON(t, body).Get("results"); len(r.Array()) != 10 || r.Get("9.id").String() != "9999" {
		t.Errorf("last page: %.300s", body)
	}
}
