package batch

import (
	"fmt"
	"math"
	"net/http"
	"strings"
	"testing"
	"time"
)

// An API that answers 503 + Retry-After while it recovers gets every
// operation through once it does; the POSTs of a sync batch, which carry
// no idempotency key, are sent once, and one that carries its own key is
// sent again. An upstream that cannot be reached counts as 502.
func TestRetryThrough503(t *testing.T) {
	be := newBackend(t)
	down := freePort(t) // nothing listens there
	base := startCaddy(t, fmt.Sprintf(`
	metrics /metrics
	batch /batch {
		retry {
			statuses 429 502 503 504
			max_attempts 4
			backoff 10ms 100ms
		}
	}
	handle /down/* {
		reverse_proxy 127.0.0.1:%d
	}
	reverse_proxy %s`, down, be.addr()))
	_, _, body := send(t, "POST", base+"/batch", `{"batch":[
		{"id":"get","path":"/limited?id=get&n=2&status=503&after=0"},
		{"id":"put","method":"PUT","path":"/limited?id=put&n=3&status=503&after=0"},
		{"id":"del","method":"DELETE","path":"/limited?id=del&n=1&status=504"},
		{"id":"post","method":"POST","path":"/limited?id=post&n=1&status=503&after=0"},
		{"id":"keyed","method":"POST","path":"/limited?id=keyed&n=1&status=503&after=0","headers":{"Idempotency-Key":"k1"}},
		{"id":"down","path":"/down/x"},
		{"id":"teapot","path":"/limited?id=teapot&n=1&status=418"}]}`)
	res := mustJSON(t, body)
	for i, want := range []struct {
		status, attempts int64
	}{{200, 3}, {200, 4}, {200, 2}, {503, 0}, {200, 2}, {502, 4}, {418, 0}} {
		r := res.Get(fmt.Sprintf("results.%d", i))
		if r.Get("status").Int() != want.status || r.Get("attempts").Int() != want.attempts {
			t.Errorf("%s: %s, want status %d after %d attempts", r.Get("id"), r.Raw, want.status, want.attempts)
		}
	}
	be.mu.Lock()
	calls := map[string]int{"post": be.limited["post"], "keyed": be.limited["keyed"], "teapot": be.limited["teapot"]}
	be.mu.Unlock()
	if calls["post"] != 1 || calls["keyed"] != 2 || calls["teapot"] != 1 {
		t.Errorf("sent: %v; want a POST without a key once, one with a key twice, a status not listed once", calls)
	}
	_, _, m := send(t, "GET", base+"/metrics", "")
	for _, want := range []string{
		`caddy_batch_retries_total{status="503"} 6`,
		`caddy_batch_retries_total{status="504"} 1`,
		`caddy_batch_retries_total{status="502"} 3`,
	} {
		if !strings.Contains(m, want+"\n") {
			t.Errorf("metrics lack %q", want)
		}
	}
}

// Without a retry block a sync batch tries once; the batch field
// max_attempts asks for more, within the methods rule, and "methods all"
// sends a POST again.
func TestRetryBatchFieldAndMethods(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, `
	batch /batch
	batch /all {
		retry {
			max_attempts 3
			backoff 10ms 10ms
			methods all
		}
	}
	reverse_proxy `+be.addr())
	_, _, body := send(t, "POST", base+"/batch", `[{"path":"/limited?id=a&n=1&status=503&after=0"}]`)
	if r := mustJSON(t, body).Get("0"); r.Get("status").Int() != 503 || r.Get("attempts").Exists() {
		t.Errorf("no retry by default: %s", r.Raw)
	}
	_, _, body = send(t, "POST", base+"/batch", `{"max_attempts":3,"batch":[
		{"path":"/limited?id=b&n=2&status=503&after=0"},
		{"method":"POST","path":"/limited?id=c&n=2&status=503&after=0"}]}`)
	res := mustJSON(t, body)
	if r := res.Get("results.0"); r.Get("status").Int() != 200 || r.Get("attempts").Int() != 3 {
		t.Errorf("max_attempts 3: %s", r.Raw)
	}
	if r := res.Get("results.1"); r.Get("status").Int() != 503 || r.Get("attempts").Exists() {
		t.Errorf("a POST without a key is not sent again: %s", r.Raw)
	}
	_, _, body = send(t, "POST", base+"/all", `[{"method":"POST","path":"/limited?id=d&n=2&status=503&after=0"}]`)
	if r := mustJSON(t, body).Get("0"); r.Get("status").Int() != 200 || r.Get("attempts").Int() != 3 {
		t.Errorf("methods all: %s", r.Raw)
	}
	for _, bad := range []string{`0`, `11`, `2.5`, `"3"`} {
		status, _, body := send(t, "POST", base+"/batch", `{"max_attempts":`+bad+`,"batch":[{"path":"/health"}]}`)
		if status != 400 || !strings.Contains(body, "max_attempts must be a whole number from 1 to 10") {
			t.Errorf("max_attempts %s: %d %s", bad, status, body)
		}
	}
}

// A retry waits for the Retry-After of the answer it follows, and one
// that op_timeout cannot wait for is not made.
func TestRetryHonoursRetryAfter(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, `{
		op_timeout 3s
		retry {
			max_attempts 3
			backoff 1ms 1ms
		}
	}`))
	_, _, body := send(t, "POST", base+"/batch", `[
		{"path":"/limited?id=wait&n=1&status=503&after=1"},
		{"path":"/limited?id=long&n=1&status=503&after=5"}]`)
	res := mustJSON(t, body)
	if r := res.Get("0"); r.Get("status").Int() != 200 || r.Get("attempts").Int() != 2 {
		t.Errorf("Retry-After 1: %s", r.Raw)
	}
	if r := res.Get("1"); r.Get("status").Int() != 503 || r.Get("attempts").Exists() {
		t.Errorf("Retry-After 5 is past op_timeout 3s: %s", r.Raw)
	}
	var at []time.Time
	for _, s := range be.requests() {
		if strings.Contains(s.Path, "id=wait") {
			at = append(at, s.At)
		}
	}
	if len(at) != 2 || at[1].Sub(at[0]) < time.Second {
		t.Errorf("tries of the operation told Retry-After 1 at %v: the second must be a second after the first", at)
	}
}

// A retried operation that finally fails fails its all_or_nothing batch:
// what succeeded before it is rolled back.
func TestRetryThenRollback(t *testing.T) {
	be := newBackend(t)
	be.seed("Ann")
	base := startCaddy(t, proxySite(be, `{
		atomicity all_or_nothing
		retry {
			max_attempts 3
			backoff 1ms 5ms
		}
	}`))
	_, _, body := send(t, "POST", base+"/batch", `{"batch":[
		{"id":"rename","method":"PATCH","path":"/users/1","body":{"name":"Bob"},
		 "rollback":{"method":"PATCH","path":"/users/1","body":{"name":"Ann"}}},
		{"id":"busy","method":"PUT","path":"/limited?id=busy&n=9&status=503&after=0"}]}`)
	res := mustJSON(t, body)
	if res.Get("status").String() != "rolled_back" || res.Get("results.1.attempts").Int() != 3 ||
		!res.Get("results.0.undone").Bool() {
		t.Errorf("want the retried PUT to fail after 3 tries and the PATCH undone: %s", body)
	}
	if u, _ := be.API.Get(1); u.Name != "Ann" {
		t.Errorf("user 1 is %q after the rollback", u.Name)
	}
}

// A job sends each operation with an idempotency key: its POSTs answered
// 429 or 503 are tried again by default, five tries in all.
func TestRetryJobDefaults(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, asyncSite(be, ""))
	id := submitJob(t, base+"/batch", `{"async":true,"batch":[
		{"method":"POST","path":"/limited?id=j1&n=2&status=503"},
		{"method":"POST","path":"/limited?id=j2&n=9&status=503"},
		{"method":"POST","path":"/limited?id=j3&n=9&status=502"}]}`)
	waitJob(t, base+"/batch/"+id, alice, "completed")
	_, _, body := send(t, "GET", base+"/batch/"+id+"/results", "", alice)
	res := mustJSON(t, body)
	if r := res.Get("results.0"); r.Get("status").Int() != 200 || r.Get("attempts").Int() != 3 {
		t.Errorf("j1: %s", r.Raw)
	}
	if r := res.Get("results.1"); r.Get("status").Int() != 503 || r.Get("attempts").Int() != 5 {
		t.Errorf("j2: %s", r.Raw)
	}
	if r := res.Get("results.2"); r.Get("status").Int() != 502 || r.Get("attempts").Exists() {
		t.Errorf("j3: 502 is not retried by default: %s", r.Raw)
	}
	var keys []string
	for _, s := range be.requests() {
		if strings.Contains(s.Path, "id=j1") {
			keys = append(keys, s.Header.Get("Idempotency-Key"))
		}
	}
	if len(keys) != 3 || keys[0] == "" || keys[0] != keys[1] || keys[1] != keys[2] {
		t.Errorf("the tries of one operation carry one key: %q", keys)
	}
}

// A retry's wait stays within its backoff, at any bound the config takes:
// a cap of the longest duration (a JSON config's integer) made the draw
// panic, outside any recover, which ended Caddy.
func TestRetryWaitWithinBackoff(t *testing.T) {
	for _, c := range []struct{ first, cap time.Duration }{
		{200 * time.Millisecond, 30 * time.Second},
		{time.Nanosecond, time.Nanosecond},
		{time.Second, math.MaxInt64},
		{math.MaxInt64, math.MaxInt64},
	} {
		p := retryPolicy{first: c.first, cap: c.cap}
		for n := 1; n <= 70; n++ {
			if d := p.wait(http.Header{}, n); d < 0 || d > c.cap {
				t.Fatalf("first %v, cap %v: retry %d waits %v", c.first, c.cap, n, d)
			}
		}
	}
}
