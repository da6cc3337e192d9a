package batch

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/tidwall/gjson"
)

// Webhook deliveries, backoff waits included, end with the config: a
// grace at Destruct, then they are canceled.
func TestAsyncWebhookDeliveriesEndWithConfig(t *testing.T) {
	setVar(t, &webhookBackoff, time.Hour)
	setVar(t, &webhookGrace, 50*time.Millisecond)
	attempts := make(chan struct{}, 10)
	recv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		attempts <- struct{}{}
		w.WriteHeader(500)
	}))
	t.Cleanup(recv.Close)
	be := newBackend(t)
	base := startCaddy(t, asyncSite(be, "webhook "+recv.URL+" {\n\tsecret s\n}"))
	waitJob(t, base+"/batch/"+submitJob(t, base+"/batch", `[{"path":"/health"}]`), alice, "completed")
	select {
	case <-attempts:
	case <-time.After(10 * time.Second):
		t.Fatal("no delivery")
	}
	if n := goroutinesIn("(*asyncJobs).deliver"); n != 1 {
		t.Fatalf("%d deliveries in flight, want 1", n)
	}
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	eventually(t, 5*time.Second, "delivery ended with the config", func() bool { return goroutinesIn("(*asyncJobs).deliver") == 0 })
}

// Deliveries in flight at once are bounded: a receiver that never answers
// does not make every ended job hold a goroutine.
func TestAsyncWebhookDeliveriesBounded(t *testing.T) {
	setVar(t, &maxDeliveries, 2)
	setVar(t, &webhookGrace, 50*time.Millisecond)
	var mu sync.Mutex
	inFlight, most := 0, 0
	hang := make(chan struct{})
	recv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		inFlight++
		most = max(most, inFlight)
		mu.Unlock()
		select {
		case <-hang:
		case <-r.Context().Done():
		}
		mu.Lock()
		inFlight--
		mu.Unlock()
	}))
	t.Cleanup(recv.Close)
	t.Cleanup(func() { close(hang) })
	be := newBackend(t)
	base := startCaddy(t, asyncSite(be, "webhook "+recv.URL+" {\n\tsecret s\n}"))
	for range 5 {
		waitJob(t, base+"/batch/"+submitJob(t, base+"/batch", `[{"path":"/health"}]`), alice, "completed")
	}
	eventually(t, 5*time.Second, "two deliveries waiting", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return inFlight == 2
	})
	if n := goroutinesIn("(*asyncJobs).deliver"); n != 2 {
		t.Errorf("%d deliveries in flight, want 2", n)
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
	_, _, body := send(t, "POST", base+"/batch", `[{"path":"/health"},{"path":"/users/404"}]`, alice, "Prefer: respond-async")
	id := mustJSON(t, body).Get("id").String()
	waitJob(t, base+"/batch/"+id, alice, "completed")
	eventually(t, 5*time.Second, "the failed delivery and its retry", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(deliveries) >= 2
	})
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

// The event of a job's end outlives the instance that owes it: stored
// with the job until delivered, it is sent by the instance that takes the
// job over, with the same Batch-Event-Id.
func TestAsyncWebhookEventOutlivesInstance(t *testing.T) {
	var mu sync.Mutex
	var ok, failed []string
	accept := make(chan struct{})
	recv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		select {
		case <-accept:
			ok = append(ok, r.Header.Get("Batch-Event-Id"))
		default:
			failed = append(failed, r.Header.Get("Batch-Event-Id"))
			w.WriteHeader(503)
		}
	}))
	t.Cleanup(recv.Close)
	be := newBackend(t)
	storage := t.TempDir()
	_, b, child := twoCaddies(t, storage, proxySite(be, `{
		inherit_headers User-Agent
		async {
			owner {http.request.header.X-Api-Key}
			lease 1s
			webhook `+recv.URL+` {
				secret s
				max_attempts 100
			}
		}
	}`))
	// No credential is inherited: without a key, the job is resumable.
	status, _, body := send(t, "POST", b+"/batch", `[{"path":"/health"}]`, "X-Api-Key: k", "Prefer: respond-async")
	if status != 202 {
		t.Fatalf("%d %s", status, body)
	}
	id := mustJSON(t, body).Get("id").String()
	eventually(t, 10*time.Second, "a failed delivery", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(failed) > 0
	})
	_ = child.Kill()
	receive(t, 10*time.Second, "the killed child to end", child.exited)
	close(accept)
	eventually(t, 10*time.Second, "the event delivered by the instance left", func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(ok) > 0
	})
	mu.Lock()
	if ok[0] != id+".completed" || failed[0] != id+".completed" {
		t.Errorf("Batch-Event-Id %q after %q, want %s.completed", ok[0], failed[0], id)
	}
	mu.Unlock()
	eventually(t, 5*time.Second, "the delivered event and the job's listing gone", func() bool {
		_, err1 := os.Stat(filepath.Join(storage, "batch", "jobs", id, "event"))
		_, err2 := os.Stat(filepath.Join(storage, "batch", "active", id))
		return os.IsNotExist(err1) && os.IsNotExist(err2)
	})
}

// A webhook receiver answering a redirect does not get the event sent on:
// not to another host, not to an internal URL such as Caddy's admin API.
// The redirect is a failed delivery, retried at the receiver's URL.
func TestAsyncWebhookRedirectNotFollowed(t *testing.T) {
	setVar(t, &webhookBackoff, 10*time.Millisecond)
	var internal atomic.Int64
	target := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { internal.Add(1) }))
	t.Cleanup(target.Close)
	for _, code := range []int{301, 302, 303, 307, 308} {
		var posts atomic.Int64
		recv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			posts.Add(1)
			http.Redirect(w, r, target.URL+"/stop", code)
		}))
		be := newBackend(t)
		base := startCaddy(t, asyncSite(be, "webhook "+recv.URL+" {\n\tsecret s\n\tmax_attempts 2\n}"))
		waitJob(t, base+"/batch/"+submitJob(t, base+"/batch", `[{"path":"/health"}]`), alice, "completed")
		eventually(t, 5*time.Second, "both attempts at the receiver", func() bool { return posts.Load() == 2 })
		if err := caddy.Stop(); err != nil {
			t.Fatal(err)
		}
		recv.Close()
		if n := internal.Load(); n != 0 {
			t.Fatalf("%d: the redirect was followed %d times", code, n)
		}
	}
}

// The end event of a job is delivered by one delivery, however long its
// receiver takes: the instance that sends it does not take the job over
// from itself while it does, and nothing re-delivers it.
func TestAsyncWebhookDeliveredOnce(t *testing.T) {
	setVar(t, &webhookTimeout, 300*time.Millisecond)
	setVar(t, &webhookGrace, 50*time.Millisecond)
	var posts atomic.Int64
	recv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		posts.Add(1)
		select { // never answers in time
		case <-r.Context().Done():
		case <-time.After(2 * time.Second):
		}
	}))
	t.Cleanup(recv.Close)
	be := newBackend(t)
	base := startCaddy(t, asyncSite(be, "lease 500ms\n\t\t\twebhook "+recv.URL+" {\n\tsecret s\n\tmax_attempts 1\n}"))
	waitJob(t, base+"/batch/"+submitJob(t, base+"/batch", `[{"path":"/health"}]`), alice, "completed")
	eventually(t, 5*time.Second, "a delivery", func() bool { return posts.Load() > 0 })
	// Many looks for orphaned jobs (every lease/10) and the attempt's
	// timeout pass.
	time.Sleep(1500 * time.Millisecond)
	if n := posts.Load(); n != 1 {
		t.Errorf("the event was posted %d times with max_attempts 1", n)
	}
	if n := goroutinesIn("(*asyncJobs).deliver"); n != 0 {
		t.Errorf("%d deliveries still in flight", n)
	}
}
