package batch

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
)

// The budget's batch fields, in the native and JSON batch formats.
func TestFailureBudgetFields(t *testing.T) {
	t.Parallel()
	lim := ptLimits(t, nil)
	ok := []struct {
		body string
		max  int
		rate float64
	}{
		{`{"batch":[{"path":"/a"}],"max_failures":50}`, 50, 0},
		{`{"batch":[{"path":"/a"}],"max_failure_rate":0.05}`, 0, 0.05},
		{`{"batch":[{"path":"/a"}],"max_failure_rate":1,"max_failures":1}`, 1, 1},
		{`{"operation":{"path":"/a"},"items":[1],"max_failures":1000000000}`, 1_000_000_000, 0},
	}
	for _, tc := range ok {
		if b := ptParse(t, lim, tc.body); b.maxFailures != tc.max || b.maxFailureRate != tc.rate {
			t.Errorf("%s: max_failures %d, max_failure_rate %v", tc.body, b.maxFailures, tc.rate)
		}
	}
	bad := map[string]string{
		`"max_failures":0`:          "max_failures must be a whole number",
		`"max_failures":-3`:         "max_failures must be a whole number",
		`"max_failures":2.5`:        "max_failures must be a whole number",
		`"max_failures":"5"`:        "max_failures must be a whole number",
		`"max_failures":1e12`:       "max_failures must be a whole number",
		`"max_failure_rate":0`:      "max_failure_rate must be a fraction",
		`"max_failure_rate":5`:      "max_failure_rate must be a fraction",
		`"max_failure_rate":-0.1`:   "max_failure_rate must be a fraction",
		`"max_failure_rate":"5%"`:   "max_failure_rate must be a fraction",
		`"max_failure_rate":null`:   "max_failure_rate must be a fraction",
		`"max_failure_rate":[0.5]`:  "max_failure_rate must be a fraction",
		`"max_failures":{"n":5}`:    "max_failures must be a whole number",
		`"max_failure_rate":1.0001`: "max_failure_rate must be a fraction",
	}
	for field, want := range bad {
		body := `{"batch":[{"path":"/a"}],` + field + `}`
		if faults := ptFaults(t, lim, body); !strings.Contains(faults[0].Message, want) {
			t.Errorf("%s: %v", body, faults)
		}
	}

	r := httptest.NewRequest("POST", "/$batch", nil)
	b, err := jsonBatch.decode(r, []byte(`{"requests":[{"id":"1","method":"GET","url":"/a"}],"max_failures":3,"max_failure_rate":0.25}`), lim)
	if err != nil || b.maxFailures != 3 || b.maxFailureRate != 0.25 {
		t.Errorf("JSON batch budget: %v %+v", err, b)
	}
	if _, err := jsonBatch.decode(r, []byte(`{"requests":[{"id":"1","method":"GET","url":"/a"}],"max_failures":0}`), lim); err == nil ||
		!strings.Contains(err.Error(), "max_failures must be") {
		t.Errorf("JSON batch max_failures 0: %v", err)
	}
}

// What exhausts a budget: reaching max_failures, or a share of failures
// reaching max_failure_rate once the sample has run; not what was skipped,
// nor the failure a condition tests, nor an operation cut off.
func TestFailureBudgetCounts(t *testing.T) {
	t.Parallel()
	ok, fail := result{status: 200}, result{status: 500}
	skip := result{status: statusSkipped, err: "dependency a failed with status 500"}
	unmet := result{status: http.StatusPreconditionFailed, err: errConditionFalse}
	cut := result{status: http.StatusGatewayTimeout, err: "batch timed out", cut: true}
	cases := []struct {
		name string
		h    *Handler
		b    batch
		run  []result
		// spentAt is the number of results after which the budget is
		// exhausted; -1 for never.
		spentAt int
	}{
		{"none", &Handler{}, batch{}, []result{fail, fail, fail}, -1},
		{"max reached", &Handler{MaxFailures: 2}, batch{}, []result{fail, ok, fail, ok}, 3},
		{"batch field wins", &Handler{MaxFailures: 2}, batch{maxFailures: 3}, []result{fail, fail, fail}, 3},
		{"skipped counts nothing", &Handler{MaxFailures: 1}, batch{}, []result{skip, unmet, ok, fail}, 4},
		{"cut counts nothing", &Handler{MaxFailures: 1}, batch{}, []result{cut, cut}, -1},
		{"rate waits for the sample", &Handler{MaxFailureRate: 0.5, FailureRateSample: 4}, batch{}, []result{fail, fail, ok, ok}, 4},
		{"rate below", &Handler{MaxFailureRate: 0.5, FailureRateSample: 4}, batch{}, []result{fail, ok, ok, ok, fail, ok}, -1},
		{"rate reached later", &Handler{MaxFailureRate: 0.5, FailureRateSample: 2}, batch{}, []result{ok, ok, ok, fail, fail}, -1},
		{"rate exact", &Handler{MaxFailureRate: 0.2, FailureRateSample: 5}, batch{}, []result{ok, ok, ok, ok, fail}, 5},
		{"rate default sample", &Handler{}, batch{maxFailureRate: 1}, []result{fail, fail, fail}, -1},
		{"rate skipped are no sample", &Handler{MaxFailureRate: 0.5, FailureRateSample: 2}, batch{}, []result{skip, skip, fail}, -1},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			fb := newFailureBudget(tc.h, &tc.b)
			spentAt := -1
			for i, res := range tc.run {
				fb.count(&operation{}, &res)
				if spentAt < 0 && fb.exhausted() {
					spentAt = i + 1
				}
			}
			if spentAt != tc.spentAt {
				t.Errorf("exhausted after %d results, want %d", spentAt, tc.spentAt)
			}
		})
	}
	fb := newFailureBudget(&Handler{MaxFailures: 1}, &batch{})
	fb.count(&operation{tested: true}, &result{status: 404})
	if fb.exhausted() {
		t.Error("the failure of an operation a condition tests spent the budget")
	}
	fb = newFailureBudget(&Handler{MaxFailures: 10}, &batch{})
	if fb.seed(9, 20); fb.exhausted() {
		t.Error("seeded below the budget, exhausted")
	}
	if fb.count(&operation{}, &fail); !fb.exhausted() {
		t.Error("the failure after a seed of 9 did not reach 10")
	}
}

// notFoundOps returns n operations that the backend answers 404, numbered.
func notFoundOps(n int) []string {
	ops := make([]string, n)
	for i := range ops {
		ops[i] = fmt.Sprintf(`{"path":"/users/%d"}`, 900000+i)
	}
	return ops
}

// countPrefix counts the requests the backend received for paths that
// start with prefix.
func countPrefix(be *backend, prefix string) int {
	n := 0
	for _, r := range be.requests() {
		if strings.HasPrefix(r.Path, prefix) {
			n++
		}
	}
	return n
}

// A sync batch stops where its budget is spent: sequential, at the
// failure that reaches it; parallel, once the operations in flight have
// finished. The rest are skipped, and the envelope says "stopped".
func TestSyncBatchFailureBudget(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, `{
		max_ops 200
		concurrency 4
		max_failure_rate 0.5 10
	}`))
	ops := notFoundOps(100)

	_, _, body := send(t, "POST", base+"/batch", `{"max_failures":5,"metadata":{"run":"7"},"batch":[`+strings.Join(ops, ",")+`]}`)
	res := mustJSON(t, body)
	if sent := countPrefix(be, "/users/9"); sent != 5 || res.Get("metadata.run").String() != "7" ||
		res.Get("status").String() != statusStopped || res.Get("failed").Int() != 5 || res.Get("skipped").Int() != 95 {
		t.Fatalf("sequential: %d sent; status %s failed %d skipped %d", sent, res.Get("status"), res.Get("failed").Int(), res.Get("skipped").Int())
	}
	if r := res.Get("results.5"); r.Get("status").Int() != 424 || r.Get("error").String() != errBudgetExhausted {
		t.Errorf("first skipped result: %s", r.Raw)
	}

	before := countPrefix(be, "/users/9")
	_, _, body = send(t, "POST", base+"/batch", `{"mode":"parallel","max_failures":5,"batch":[`+strings.Join(ops, ",")+`]}`)
	res = mustJSON(t, body)
	sent := countPrefix(be, "/users/9") - before
	// The fifth failure stops the rest; at most one operation of each
	// other worker was on its way then.
	if sent < 5 || sent > 5+3 || res.Get("status").String() != statusStopped || int(res.Get("failed").Int()) != sent ||
		int(res.Get("skipped").Int()) != 100-sent {
		t.Fatalf("parallel: %d sent; status %s failed %d skipped %d", sent, res.Get("status"), res.Get("failed").Int(), res.Get("skipped").Int())
	}

	// The configured rate: 20 successes, then failures; the 20th failure
	// makes half of the 40 run.
	var mixed []string
	for i := range 20 {
		mixed = append(mixed, fmt.Sprintf(`{"path":"/health?i=%d"}`, i))
	}
	before = countPrefix(be, "/users/9")
	_, _, body = send(t, "POST", base+"/batch", `{"batch":[`+strings.Join(append(mixed, ops...), ",")+`]}`)
	res = mustJSON(t, body)
	if sent := countPrefix(be, "/users/9") - before; sent != 20 || res.Get("status").String() != statusStopped {
		t.Fatalf("rate: %d failures sent; status %s", sent, res.Get("status"))
	}
	// A CSV batch takes them in its query.
	before = countPrefix(be, "/users/9")
	_, _, body = send(t, "POST", base+"/batch?method=GET&path=/users/{{item.id}}&max_failures=2&metadata.src=csv",
		"id\n900001\n900002\n900003\n900004\n", "Content-Type: text/csv")
	res = mustJSON(t, body)
	if sent := countPrefix(be, "/users/9") - before; sent != 2 || res.Get("status").String() != statusStopped || res.Get("metadata.src").String() != "csv" {
		t.Errorf("CSV: %d sent; %s", sent, body)
	}
	// Under the budget, a batch ends as it did.
	_, _, body = send(t, "POST", base+"/batch", `{"max_failures":5,"batch":[`+strings.Join(ops[:4], ",")+`]}`)
	if res := mustJSON(t, body); res.Get("status").String() != statusCompletedWithErrors {
		t.Errorf("4 failures of a budget of 5: %s", res.Get("status"))
	}
}

// A job of 10,000 operations that all fail stops at its budget, not after
// the 10,000: the backend sees about the budget, the job ends "stopped"
// with stop_reason failure_budget, and the webhook is told "stopped".
func TestJobFailureBudget(t *testing.T) {
	setVar(t, &webhookBackoff, 10*time.Millisecond)
	var mu sync.Mutex
	var events []string
	recv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		mu.Lock()
		events = append(events, string(body))
		mu.Unlock()
	}))
	t.Cleanup(recv.Close)
	be := newBackend(t)
	base := startCaddy(t, asyncSite(be, `webhook `+recv.URL+` {
				secret s3cret
			}`))
	var lines []string
	lines = append(lines, `{"mode":"parallel","max_failures":50,"metadata":{"import":"crm-7"}}`)
	lines = append(lines, notFoundOps(10_000)...)
	status, _, body := send(t, "POST", base+"/batch", strings.Join(lines, "\n"), alice, "Content-Type: application/x-ndjson")
	if status != 202 {
		t.Fatalf("submit: %d %s", status, body)
	}
	id := mustJSON(t, body).Get("id").String()
	p := waitJob(t, base+"/batch/"+id, alice, statusStopped, stateCompleted, stateError)
	sent := countPrefix(be, "/users/9")
	// concurrency 10: the 50th failure stops the rest; at most nine were
	// on their way then.
	if p.Get("status").String() != stateStopped || p.Get("stop_reason").String() != stopFailureBudget ||
		sent < 50 || sent > 59 || int(p.Get("failed").Int()) != sent || int(p.Get("skipped").Int()) != 10_000-sent {
		t.Fatalf("%d operations sent; %s", sent, p.Raw)
	}
	t.Logf("budget 50 of 10,000 failing operations: %d sent", sent)
	_, _, body = send(t, "GET", base+"/batch/"+id+"/results?offset=9999", "", alice)
	res := mustJSON(t, body)
	if r := res.Get("results.0"); res.Get("status").String() != statusStopped || r.Get("status").Int() != 424 || r.Get("error").String() != errBudgetExhausted {
		t.Errorf("results: %.400s", body)
	}
	eventually(t, 10*time.Second, "the stopped event", func() bool {
		mu.Lock()
		defer mu.Unlock()
		for _, e := range events {
			var ev struct {
				Type  string
				Batch progress
			}
			if json.Unmarshal([]byte(e), &ev) == nil && ev.Type == "batch.stopped" && ev.Batch.StopReason == stopFailureBudget && ev.Batch.ID == id &&
				ev.Batch.Metadata["import"] == "crm-7" {
				return true
			}
		}
		return false
	})
}

// The budget carries across a restart: what failed before the job was
// handed over counts where it resumes.
func TestJobFailureBudgetAcrossRestart(t *testing.T) {
	be := newBackend(t)
	base, restart := restartableCaddy(t, be)
	// Each failure follows an operation that takes a while, so that the
	// restart falls between the first failures and the budget.
	lines := []string{`{"max_failures":30}`}
	for i := range 200 {
		lines = append(lines, fmt.Sprintf(`{"path":"/slow?id=s%d&d=20ms"}`, i), fmt.Sprintf(`{"path":"/users/%d"}`, 900000+i))
	}
	status, _, body := send(t, "POST", base+"/batch?metadata.run=restart", strings.Join(lines, "\n"), alice, "Content-Type: application/x-ndjson")
	if status != 202 {
		t.Fatalf("submit: %d %s", status, body)
	}
	id := mustJSON(t, body).Get("id").String()
	eventually(t, 10*time.Second, "a few failures", func() bool { return countPrefix(be, "/users/9") >= 5 })
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	before := countPrefix(be, "/users/9")
	base = restart()
	p := waitJob(t, base+"/batch/"+id, alice, stateStopped, stateCompleted, stateError)
	if sent := countPrefix(be, "/users/9"); p.Get("status").String() != stateStopped || sent != 30 || p.Get("failed").Int() != 30 ||
		before >= 30 || p.Get("metadata.run").String() != "restart" {
		t.Fatalf("%d failures before the restart, %d in all: %s", before, sent, p.Raw)
	}
	t.Logf("budget 30: %d failures before the restart, 30 in all", before)
}
