package batch

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// Under atomicity any end of the batch after a success stops it there and
// rolls back what ran: also a timeout, the client going away or a cancel
// between two operations, not only a failed operation.
func TestAtomicityStopsAtEveryEnd(t *testing.T) {
	t.Parallel()
	h := &Handler{Atomicity: atomicAllOrNothing}
	provision(t, h)
	b, err := parseBatch(context.Background(), []byte(`[{"path":"/a"},{"path":"/b"}]`), &h.rules)
	if err != nil {
		t.Fatal(err)
	}
	for name, end := range map[string]func(rn *runner, cancel context.CancelFunc){
		"timeout or client gone": func(_ *runner, cancel context.CancelFunc) { cancel() },
		"canceled job":           func(rn *runner, _ context.CancelFunc) { rn.job = canceledJob{} },
	} {
		ctx, cancel := context.WithCancel(context.Background())
		rn := &runner{h: h, b: b, ctx: ctx, results: make([]result, 2), stoppedAt: -1}
		rn.results[0] = result{status: 200}
		end(rn, cancel)
		clk := rn.newClock(rn.ctx)
		res := rn.runOne(b.ops[1], clk)
		clk.stop()
		cancel()
		if !res.failed() || rn.stoppedAt != 1 {
			t.Errorf("%s between operations: result %d %q, stopped at %d: the success before it would not be rolled back",
				name, res.status, res.err, rn.stoppedAt)
		}
	}
}

// canceledJob is a job canceled between two operations.
type canceledJob struct{}

func (canceledJob) halted() string    { return "skipped: batch canceled" }
func (canceledJob) handingOver() bool { return false }
func (canceledJob) resumable() bool   { return true }

// A job canceled under all_or_nothing rolls back what it ran.
func TestAllOrNothingCanceledJobRollsBack(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, asyncSite(be, ""))
	_, hdr, body := send(t, "POST", base+"/batch", `{"atomicity":"all_or_nothing","batch":[
		{"id":"mk","method":"POST","path":"/users","body":{"name":"Temp"},"rollback":{"method":"DELETE","path":"/users/{{mk.body.id}}"}},
		{"path":"/slow?d=600ms&id=s"},
		{"method":"POST","path":"/users","body":{"name":"Never"}}]}`, alice, "Prefer: respond-async")
	job := base + hdr.Get("Location")
	if hdr.Get("Location") == "" {
		t.Fatalf("submit: %s", body)
	}
	eventually(t, 10*time.Second, "the slow operation to start", func() bool { return slices.Contains(be.eventLog(), "start s") })
	if status, _, body := send(t, "DELETE", job, "", alice); status != 200 && status != 202 {
		t.Fatalf("cancel: %d %s", status, body)
	}
	waitJob(t, job, alice, "canceled")
	_, _, body = send(t, "GET", job+"/results", "", alice)
	res := mustJSON(t, body)
	if res.Get("results.0.undone").Bool() != true || res.Get("results.0.rollback.status").Int() != 204 ||
		res.Get("results.2.status").Int() != 424 || res.Get("status").String() != "rolled_back" {
		t.Errorf("results: %s", body)
	}
	if be.API.Len() != 0 {
		t.Errorf("the created user was not removed: %d users", be.API.Len())
	}
}

// Rollbacks have a budget of their own, the batch's timeout once more:
// they do not run on past it, whatever their number.
func TestRollbacksBounded(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, `{
		atomicity all_or_nothing
		timeout 400ms
	}`))
	var ops []string
	for i := range 3 {
		ops = append(ops, fmt.Sprintf(`{"method":"POST","path":"/users","body":{"name":"U%d"},"rollback":{"path":"/slow?d=280ms&id=rb%d"}}`, i, i))
	}
	ops = append(ops, `{"method":"POST","path":"/users","body":{}}`) // 422
	_, _, body := send(t, "POST", base+"/batch", `{"batch":[`+strings.Join(ops, ",")+`]}`)
	res := mustJSON(t, body)
	if res.Get("status").String() != "rollback_failed" {
		t.Errorf("status: %s", body)
	}
	// Reverse order: rb2 runs (280 ms), rb1 is cut off at the budget, rb0
	// never starts.
	if r := res.Get("results.0.rollback"); r.Get("status").Int() != 504 || !strings.Contains(r.Get("error").String(), "rollbacks timed out after 400ms") {
		t.Errorf("first operation's rollback: %s", r.Raw)
	}
	if slices.Contains(be.eventLog(), "start rb0") {
		t.Errorf("a rollback started past the budget: %v", be.eventLog())
	}
}

// 50 parallel POSTs come back complete and in order.
func TestParallelFiftyInOrder(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, `{
		mode parallel
		concurrency 8
	}`))

	var ops []string
	for i := range 50 {
		ops = append(ops, fmt.Sprintf(`{"id":"op%d","method":"POST","path":"/users","body":{"name":"user %d"}}`, i, i))
	}
	status, _, body := send(t, "POST", base+"/batch", "["+strings.Join(ops, ",")+"]")
	if status != 200 {
		t.Fatalf("status %d: %s", status, body)
	}
	res := mustJSON(t, body).Array()
	if len(res) != 50 {
		t.Fatalf("%d results, want 50", len(res))
	}
	ids := map[int64]bool{}
	for i, r := range res {
		if r.Get("id").String() != fmt.Sprintf("op%d", i) || r.Get("status").Int() != 201 ||
			r.Get("body.name").String() != fmt.Sprintf("user %d", i) {
			t.Errorf("result %d out of place: %s", i, r.Raw)
		}
		ids[r.Get("body.id").Int()] = true
	}
	if len(ids) != 50 || be.API.Len() != 50 {
		t.Errorf("backend created %d users with %d distinct ids, want 50", be.API.Len(), len(ids))
	}
}

func TestTimeoutsAndLimits(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, `{
		op_timeout 200ms
		max_response_size 1KB
	}`))
	status, _, body := send(t, "POST", base+"/batch", `[
		{"path":"/slow?d=5s"},
		{"path":"/big?n=800"},
		{"path":"/big?n=5000"},
		{"path":"/slow?d=1ms"}]`)
	if status != 200 {
		t.Fatalf("status %d: %s", status, body)
	}
	res := mustJSON(t, body)
	for i, want := range []int64{504, 200, 502, 200} {
		if got := res.Get(fmt.Sprintf("%d.status", i)).Int(); got != want {
			t.Errorf("op %d: status %d, want %d: %s", i, got, want, res.Get(fmt.Sprint(i)).Raw)
		}
	}
	if !strings.Contains(res.Get("0.error").String(), "timed out") || !strings.Contains(res.Get("2.error").String(), "max_response_size") {
		t.Errorf("batch-layer errors must say why: %s", body)
	}
	if len(res.Get("1.body").String()) != 800 {
		t.Error("a response within the limit is kept whole")
	}

	// The whole batch is bounded by timeout: what did not finish is 504.
	base = startCaddy(t, proxySite(be, `{
		timeout 300ms
	}`))
	_, _, body = send(t, "POST", base+"/batch", `[{"path":"/slow?d=1ms"},{"path":"/slow?d=5s"},{"path":"/slow?d=1ms"}]`)
	res = mustJSON(t, body)
	if res.Get("0.status").Int() != 200 || res.Get("1.status").Int() != 504 || res.Get("2.status").Int() != 504 {
		t.Errorf("batch timeout: %s", body)
	}
	if !strings.Contains(res.Get("2.error").String(), "batch timed out") {
		t.Errorf("unrun op after batch timeout: %s", res.Get("2").Raw)
	}
}

// Operations that wait for none run on concurrency workers, started in
// array order, and their results come back in order though they end out
// of it.
func TestParallelIndependent(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, `{
		mode parallel
		concurrency 3
	}`))
	sleeps := []int{60, 10, 30, 10, 40, 10, 20, 10, 30}
	var ops []string
	total := 0
	for i, ms := range sleeps {
		ops = append(ops, fmt.Sprintf(`{"id":"p%d","path":"/slow?id=p%d&d=%dms"}`, i, i, ms))
		total += ms
	}
	start := time.Now()
	status, _, body := send(t, "POST", base+"/batch", "["+strings.Join(ops, ",")+"]")
	elapsed := time.Since(start)
	if status != 200 {
		t.Fatalf("status %d: %s", status, body)
	}
	for i, r := range mustJSON(t, body).Array() {
		if r.Get("id").String() != fmt.Sprintf("p%d", i) || r.Get("status").Int() != 200 {
			t.Errorf("result %d: %s", i, r.Raw)
		}
	}
	be.mu.Lock()
	maxIn := be.maxInFlight
	be.mu.Unlock()
	if maxIn != 3 {
		t.Errorf("%d operations in flight at most, want concurrency 3", maxIn)
	}
	var first []string
	for _, e := range be.eventLog() {
		if id, ok := strings.CutPrefix(e, "start "); ok && len(first) < 3 {
			first = append(first, id)
		}
	}
	slices.Sort(first)
	if !slices.Equal(first, []string{"p0", "p1", "p2"}) {
		t.Errorf("first three started: %v, want p0 p1 p2 (array order)", first)
	}
	if elapsed >= time.Duration(total)*time.Millisecond {
		t.Errorf("took %v, as long as one after another (%d ms)", elapsed, total)
	}
}

func TestStopOnError(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, ""))
	_, _, body := send(t, "POST", base+"/batch", `{"atomicity":"stop_on_error","mode":"parallel","batch":[
		{"id":"one","method":"POST","path":"/users","body":{"name":"A"}},
		{"id":"bad","method":"POST","path":"/users","body":{}},
		{"id":"three","method":"POST","path":"/users","body":{"name":"C"}}]}`)
	res := mustJSON(t, body)
	if res.Get("status").String() != "aborted" || res.Get("skipped").Int() != 1 || res.Get("failed").Int() != 1 {
		t.Errorf("envelope: %s", body)
	}
	if r := res.Get("results.2"); r.Get("status").Int() != 424 || r.Get("error").String() != "skipped: batch stopped at op bad" {
		t.Errorf("skipped op: %s", r.Raw)
	}
	if n := len(be.requests()); n != 2 || be.API.Len() != 1 {
		t.Errorf("backend saw %d requests and holds %d users; the op after the failure must not be sent", n, be.API.Len())
	}
}

func TestAllOrNothing(t *testing.T) {
	be := newBackend(t)
	be.seed("Ann") // id 1, balance 0
	base := startCaddy(t, proxySite(be, `{
		atomicity all_or_nothing
	}`))
	_, _, body := send(t, "POST", base+"/batch", `{"batch":[
		{"id":"before","path":"/users/1"},
		{"id":"credit","method":"PUT","path":"/users/1","body":{"name":"Ann","balance":50},
		 "rollback":{"method":"PUT","path":"/users/1","body":"{{before.body}}"}},
		{"id":"create","method":"POST","path":"/users","body":{"name":"New"},
		 "rollback":{"method":"DELETE","path":"/users/{{create.body.id}}"}},
		{"id":"note","method":"POST","path":"/echo","body":"no rollback here"},
		{"id":"fail","method":"POST","path":"/users","body":{"name":""}},
		{"id":"later","method":"POST","path":"/users","body":{"name":"Never"}}]}`)
	res := mustJSON(t, body)
	if res.Get("status").String() != "rolled_back" {
		t.Errorf("status: %s", body)
	}
	if u, _ := be.API.Get(1); u.Balance != 0 || u.Name != "Ann" {
		t.Errorf("credit not undone: %+v", u)
	}
	if be.API.Len() != 1 {
		t.Errorf("created user not undone: %d users", be.API.Len())
	}
	for i, want := range []string{`"undone":true`, `"undone":true`, `"undone":false`} {
		r := res.Get(fmt.Sprintf("results.%d", i+1))
		if !strings.Contains(r.Raw, want) {
			t.Errorf("result %d: %s, want %s", i+1, r.Raw, want)
		}
	}
	if res.Get("results.1.rollback.status").Int() != 200 || res.Get("results.2.rollback.status").Int() != 204 {
		t.Errorf("rollback results: %s", body)
	}
	if res.Get("results.5.status").Int() != 424 {
		t.Errorf("op after the failure: %s", res.Get("results.5").Raw)
	}
	// Rollbacks ran in reverse order: the DELETE before the PUT.
	reqs := be.requests()
	var tail []string
	for _, r := range reqs[len(reqs)-2:] {
		tail = append(tail, r.Method+" "+r.Path)
	}
	if strings.Join(tail, ",") != "DELETE /users/2,PUT /users/1" {
		t.Errorf("rollback order: %v", tail)
	}
	// "body":"{{before.body}}" sends that JSON answer as JSON.
	if put := reqs[len(reqs)-1]; put.Header.Get("Content-Type") != "application/json" ||
		strings.TrimSpace(string(put.Body)) != `{"id":1,"name":"Ann","balance":0}` {
		t.Errorf("whole-reference body: %s %q", put.Header.Get("Content-Type"), put.Body)
	}

	// A rollback that fails makes the batch rollback_failed.
	_, _, body = send(t, "POST", base+"/batch", `[
		{"id":"mk","method":"POST","path":"/users","body":{"name":"Tmp"},"rollback":{"method":"DELETE","path":"/users/999"}},
		{"path":"/users/12345"}]`)
	if !strings.Contains(body, `"undone":false`) || mustJSON(t, body).Get("0.rollback.status").Int() != 404 {
		t.Errorf("failed rollback: %s", body)
	}
	_, _, body = send(t, "POST", base+"/batch", `{"batch":[
		{"id":"mk","method":"POST","path":"/users","body":{"name":"Tmp"},"rollback":{"method":"DELETE","path":"/users/999"}},
		{"path":"/users/12345"}]}`)
	if mustJSON(t, body).Get("status").String() != "rollback_failed" {
		t.Errorf("want rollback_failed: %s", body)
	}
}

// lateTimer is a context whose deadline has passed and whose timer has
// not fired yet: Err is still nil.
type lateTimer struct {
	context.Context
	deadline time.Time
}

func (c lateTimer) Deadline() (time.Time, bool) { return c.deadline, true }

// An operation whose batch's or job's time is up is not sent, even before
// the context's timer says so: a job whose time passed while it waited in
// the queue sends nothing.
func TestNoOperationAfterTheDeadline(t *testing.T) {
	h := provision(t, &Handler{})
	b, err := parseBatch(context.Background(), []byte(`[{"path":"/a"}]`), &h.rules)
	if err != nil {
		t.Fatal(err)
	}
	sent := 0
	next := caddyhttp.HandlerFunc(func(http.ResponseWriter, *http.Request) error { sent++; return nil })
	ctx := lateTimer{Context: context.Background(), deadline: time.Now().Add(-time.Millisecond)}
	rn := &runner{h: h, b: b, ctx: ctx, next: next, srv: &caddyhttp.Server{}, results: make([]result, 1), stoppedAt: -1, timeout: time.Second}
	clk := rn.newClock(ctx)
	defer clk.stop()
	if res := rn.runOne(b.ops[0], clk); res.status != http.StatusGatewayTimeout || !res.cut || sent != 0 {
		t.Errorf("after the deadline: %d %q cut %v, sent %d", res.status, res.err, res.cut, sent)
	}
}

// A client that goes away mid-batch stops it: what has not started never
// reaches the backend, and what runs is canceled.
func TestClientDisconnectStopsBatch(t *testing.T) {
	cases := []struct {
		name, body string
		running    []string // ids running when the client leaves
	}{
		{"sequential", `{"mode":"sequential","batch":[{"path":"/slow?d=1ms&id=0"},{"path":"/slow?d=10s&id=1"},{"path":"/slow?d=1ms&id=2"},{"path":"/slow?d=1ms&id=3"}]}`,
			[]string{"1"}},
		{"parallel", `{"mode":"parallel","batch":[` + strings.TrimSuffix(strings.Repeat(`{"path":"/slow?d=10s&id=ID"},`, 6), ",") + `]}`,
			[]string{"0", "1"}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			be := newBackend(t)
			base := startCaddy(t, proxySite(be, `{
				concurrency 2
			}`))
			send(t, "POST", base+"/batch", `[{"path":"/health"}]`)
			check := noLeaks(t, be.Server)

			body := tc.body
			for i := 0; strings.Contains(body, "id=ID"); i++ {
				body = strings.Replace(body, "id=ID", "id="+strconv.Itoa(i), 1)
			}
			host := strings.TrimPrefix(base, "http://")
			conn, err := net.Dial("tcp", host)
			if err != nil {
				t.Fatal(err)
			}
			fmt.Fprintf(conn, "POST /batch HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s", host, len(body), body)
			waitEvents := func(prefix string, within time.Duration) bool {
				deadline := time.Now().Add(within)
				for time.Now().Before(deadline) {
					seen := map[string]bool{}
					for _, e := range be.eventLog() {
						seen[e] = true
					}
					all := true
					for _, id := range tc.running {
						all = all && seen[prefix+id]
					}
					if all {
						return true
					}
					time.Sleep(5 * time.Millisecond)
				}
				return false
			}
			if !waitEvents("start ", 5*time.Second) {
				t.Fatalf("operations %v never started: %v", tc.running, be.eventLog())
			}
			conn.Close()
			closed := time.Now()
			if !waitEvents("end ", 2*time.Second) {
				t.Errorf("running operations not canceled 2s after the client left: %v", be.eventLog())
			} else {
				t.Logf("running operations canceled %v after the client left", time.Since(closed).Round(time.Millisecond))
			}
			time.Sleep(300 * time.Millisecond) // what is left takes 1ms or starts at once: ample time to start if it were going to
			var want []string
			if tc.name == "sequential" {
				want = append(want, "start 0", "end 0")
			}
			for _, id := range tc.running {
				want = append(want, "start "+id, "end "+id)
			}
			got := be.eventLog()
			slices.Sort(got)
			slices.Sort(want)
			if fmt.Sprint(got) != fmt.Sprint(want) {
				t.Errorf("backend events %v, want %v: an operation started after the client left", got, want)
			}
			check()
		})
	}
}

// No goroutine started for a batch outlives it, whether it runs one
// operation at a time or many, and whether operations finish or time out.
func TestNoGoroutineOutlivesBatch(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, `{
		op_timeout 200ms
		concurrency 4
	}`))
	cases := []struct {
		name, body string
		want       []int64
	}{
		{"sequential", `{"mode":"sequential","batch":[{"path":"/health"},{"method":"POST","path":"/users","body":{"name":"a"}},{"path":"/slow?d=20ms"},{"path":"/users/1"}]}`,
			[]int64{200, 201, 200, 200}},
		{"parallel", `{"mode":"parallel","batch":[` + strings.TrimSuffix(strings.Repeat(`{"path":"/slow?d=20ms"},`, 10), ",") + `]}`,
			[]int64{200, 200, 200, 200, 200, 200, 200, 200, 200, 200}},
		{"op timeout", `{"mode":"sequential","batch":[{"path":"/slow?d=10s"},{"path":"/health"}]}`, []int64{504, 200}},
		{"op timeout parallel", `{"mode":"parallel","batch":[{"path":"/slow?d=10s"},{"path":"/slow?d=10s"},{"path":"/slow?d=10s"},{"path":"/slow?d=10s"},{"path":"/slow?d=10s"},{"path":"/health"}]}`,
			[]int64{504, 504, 504, 504, 504, 200}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			send(t, "POST", base+"/batch", `[{"path":"/health"}]`) // warm-up
			check := noLeaks(t, be.Server)
			status, _, body := send(t, "POST", base+"/batch", tc.body)
			if status != 200 {
				t.Fatalf("status %d: %s", status, body)
			}
			res := mustJSON(t, body).Get("results").Array()
			for i, w := range tc.want {
				if res[i].Get("status").Int() != w {
					t.Errorf("op %d: %s, want %d", i, res[i].Raw, w)
				}
			}
			check()
		})
	}
}
