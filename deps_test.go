package batch

import (
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"runtime"
	"runtime/debug"
	"slices"
	"strings"
	"testing"
)

// A chain of 10,000 operations, each depending on the one before or after
// it, is accepted without recursion as deep as the chain.
func TestParseLongChain(t *testing.T) {
	const n = 10000
	lim := ptLimits(t, &Handler{MaxOps: n, Mode: "parallel"})
	// A recursive walk needs well over 100 bytes of stack per operation;
	// an iterative one stays far below this.
	defer debug.SetMaxStack(debug.SetMaxStack(1 << 20))
	for _, forward := range []bool{false, true} {
		b := ptParse(t, lim, ptChain(n, forward))
		for i, op := range b.ops {
			want := i - 1
			if forward {
				want = i + 1
			}
			if want < 0 || want >= n {
				if len(op.deps) != 0 {
					t.Fatalf("op %d: deps %v", i, op.deps)
				}
			} else if len(op.deps) != 1 || op.deps[0] != want {
				t.Fatalf("op %d: deps %v, want [%d]", i, op.deps, want)
			}
		}
	}
	// Closing the chain into a cycle is one fault naming its start and
	// its length: naming all of it would make the answer as long as the
	// batch.
	body := strings.Replace(ptChain(n, true), `"path":"/items/9999"`, `"path":"/items/9999","depends_on":["op0"]`, 1)
	faults := ptFaults(t, lim, body)
	if len(faults) != 1 || faults[0].Message != "dependency cycle: op0 -> op1 -> op2 -> op3 -> op4 -> op5 -> op6 -> op7 -> … (10000 operations) -> op0" ||
		faults[0].Index != 0 {
		t.Errorf("faults %.300s", ptDump(faults))
	}
}

// A diamond a -> (b, c) -> d in parallel: each starts only after all it
// depends on have finished; asserted on the backend's own event order.
func TestParallelDAGOrder(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, `{
		mode parallel
		concurrency 2
	}`))
	status, _, body := send(t, "POST", base+"/batch", `[
		{"id":"d","path":"/slow?id=d&d=1ms","depends_on":["b","c"]},
		{"id":"b","path":"/slow?id=b&d=30ms","depends_on":["a"]},
		{"id":"c","path":"/slow?id=c&d=10ms","dependsOn":["a"]},
		{"id":"a","path":"/slow?id=a&d=10ms"},
		{"id":"x1","path":"/slow?id=x1&d=20ms"},
		{"id":"x2","path":"/slow?id=x2&d=20ms"},
		{"id":"x3","path":"/slow?id=x3&d=20ms"}]`)
	if status != 200 {
		t.Fatalf("%d %s", status, body)
	}
	res := mustJSON(t, body).Array()
	for i, id := range []string{"d", "b", "c", "a", "x1", "x2", "x3"} {
		if res[i].Get("id").String() != id || res[i].Get("status").Int() != 200 {
			t.Errorf("result %d: %s, want id %s status 200", i, res[i].Raw, id)
		}
	}
	ev := be.eventLog()
	pos := func(e string) int {
		i := slices.Index(ev, e)
		if i < 0 {
			t.Fatalf("no %q in %v", e, ev)
		}
		return i
	}
	for _, edge := range [][2]string{{"a", "b"}, {"a", "c"}, {"b", "d"}, {"c", "d"}} {
		if pos("end "+edge[0]) > pos("start "+edge[1]) {
			t.Errorf("%s started before %s ended: %v", edge[1], edge[0], ev)
		}
	}
	be.mu.Lock()
	maxIn := be.maxInFlight
	be.mu.Unlock()
	if maxIn > 2 {
		t.Errorf("%d operations in flight, concurrency is 2", maxIn)
	}
}

// A dependency or reference that cannot hold refuses the batch before
// anything runs (serveAlone fails a test that sends anything on).
func TestDependencyValidation(t *testing.T) {
	t.Parallel()
	h := handlerAlone(t, nil)
	cases := map[string]struct{ body, want string }{
		"forward in sequential": {`[{"id":"a","path":"/users/{{b.body.id}}"},{"id":"b","path":"/users"}]`, `depends on "b", which comes later`},
		"unknown reference":     {`[{"id":"a","path":"/users/{{zz.body.id}}"}]`, `names unknown operation "zz"`},
		"self reference":        {`[{"id":"a","path":"/users","headers":{"X":"{{a.status}}"}}]`, "its own answer"},
		"malformed reference":   {`[{"id":"a","path":"/users"},{"path":"/users/{{a.bogus}}"}]`, "must be {{ID.status}}"},
		"self dependency":       {`[{"id":"a","path":"/users","depends_on":["a"]}]`, "cannot depend on itself"},
		"cycle via reference":   {`{"mode":"parallel","batch":[{"id":"a","path":"/users/{{c.body.id}}"},{"id":"b","path":"/users/{{a.body.id}}"},{"id":"c","path":"/users","depends_on":["b"]}]}`, "dependency cycle: a -> c -> b -> a"},
		"rollback with id":      {`[{"path":"/users","rollback":{"id":"x","path":"/users"}}]`, `rollback: field "id" has no place`},
		"rollback bad path":     {`[{"path":"/users","rollback":{"path":"//evil/"}}]`, "rollback: path must be origin-form"},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			w := serveAlone(t, h, request(t, "POST", "http://127.0.0.1/batch", tc.body))
			status, body := w.Code, w.Body.String()
			var msgs []string
			for _, m := range mustJSON(t, body).Get("errors.#.message").Array() {
				msgs = append(msgs, m.String())
			}
			if status != 400 || !strings.Contains(strings.Join(msgs, "\n"), tc.want) {
				t.Errorf("status %d: %s, want 400 with %q", status, body, tc.want)
			}
		})
	}
}

// groupDependents is a JSON batch of n operations in atomicity group "g",
// then n operations that depend on the group.
func groupDependents(n int) []byte {
	var sb strings.Builder
	sb.WriteString(`{"requests":[`)
	for i := range n {
		fmt.Fprintf(&sb, `{"id":"m%d","atomicityGroup":"g","method":"POST","url":"/a"},`, i)
	}
	for i := range n {
		if i > 0 {
			sb.WriteByte(',')
		}
		fmt.Fprintf(&sb, `{"id":"d%d","url":"/b","dependsOn":["g"]}`, i)
	}
	sb.WriteString(`]}`)
	return []byte(sb.String())
}

// Depending on an atomicity group costs a constant number of edges,
// however large the group: with an edge to every member, the issue's
// 14,000 dependents of a group of 14,000 ran the process out of memory.
// The smaller size comes first, so a quadratic resolver fails there.
func TestGroupDependencyLinear(t *testing.T) {
	lim := ptLimits(t, &Handler{MaxOps: 30000, Mode: "parallel"})
	for _, n := range []int{2000, 14000} {
		body := groupDependents(n)
		r := httptest.NewRequest(http.MethodPost, "/v1.0/$batch", nil)
		var before, after runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&before)
		b, err := jsonBatch.decode(r, body, lim)
		runtime.ReadMemStats(&after)
		if err != nil {
			t.Fatalf("%d members: %v", n, err)
		}
		edges := 0
		for _, op := range b.ops {
			edges += len(op.deps)
		}
		// n-1 edges chain the group; each dependent waits on it by two.
		if want := n - 1 + 2*n; edges != want {
			t.Fatalf("%d members and %d dependents: %d edges, want %d", n, n, edges, want)
		}
		// Parsing allocates in proportion to the body; 196 million edges
		// alone would be 1.5 GB.
		t.Logf("%d members: %d bytes parsed, %d allocated", n, len(body), after.TotalAlloc-before.TotalAlloc)
		if alloc := after.TotalAlloc - before.TotalAlloc; alloc > 64*uint64(len(body)) {
			t.Errorf("%d members: parsing %d bytes allocated %d", n, len(body), alloc)
		}
	}
}

// An operation depending on a group, or reading an answer of one, starts
// only once the whole group has ended: asserted on the backend's own
// event order, with the group's members slower than the rest.
func TestGroupDependentWaitsForGroup(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, graphSite(be, `{
		mode parallel
		concurrency 4
	}`))
	status, _, body := send(t, "POST", base+"/v1.0/$batch", `{"requests":[
		{"id":"a1","atomicityGroup":"g","url":"/slow?id=a1&d=20ms"},
		{"id":"a2","atomicityGroup":"g","url":"/slow?id=a2&d=20ms"},
		{"id":"a3","atomicityGroup":"g","url":"/slow?id=a3&d=20ms"},
		{"id":"after","url":"/slow?id=after&d=1ms","dependsOn":["g"]},
		{"id":"reader","url":"/slow?id=reader&d=1ms","headers":{"X-Slept":"{{a1.body.slept}}"}},
		{"id":"member","url":"/slow?id=member&d=1ms","dependsOn":["a2"]}]}`)
	if status != 200 {
		t.Fatalf("%d %s", status, body)
	}
	for i, r := range mustJSON(t, body).Get("responses").Array() {
		if r.Get("status").Int() != 200 {
			t.Errorf("response %d: %s", i, r.Raw)
		}
	}
	ev := be.eventLog()
	pos := func(e string) int {
		i := slices.Index(ev, e)
		if i < 0 {
			t.Fatalf("no %q in %v", e, ev)
		}
		return i
	}
	for _, op := range []string{"after", "reader", "member"} {
		for _, m := range []string{"a1", "a2", "a3"} {
			if pos("end "+m) > pos("start "+op) {
				t.Errorf("%s started before %s of its group ended: %v", op, m, ev)
			}
		}
	}
}

// In a sequential batch, depending on a group that comes later is one
// fault, naming the group's first operation, not one per member.
func TestGroupDependencyLater(t *testing.T) {
	t.Parallel()
	lim := ptLimits(t, nil)
	r := httptest.NewRequest(http.MethodPost, "/$batch", nil)
	_, err := jsonBatch.decode(r, []byte(`{"requests":[
		{"id":"x","url":"/a","dependsOn":["g"]},
		{"id":"y","url":"/a","headers":{"X":"{{m2.status}}"}},
		{"id":"m1","atomicityGroup":"g","url":"/a"},
		{"id":"m2","atomicityGroup":"g","url":"/a"},
		{"id":"m3","atomicityGroup":"g","url":"/a"}]}`), lim)
	var faults badBatchError
	if !errors.As(err, &faults) || len(faults) != 2 ||
		faults[0].ID != "x" || !strings.Contains(faults[0].Message, `depends on "m1", which comes later`) ||
		faults[1].ID != "y" || !strings.Contains(faults[1].Message, `depends on "m1", which comes later`) {
		t.Errorf("faults %v", err)
	}
}
