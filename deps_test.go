package batch

import (
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

func TestDependencyValidation(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, ""))
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
			status, _, body := send(t, "POST", base+"/batch", tc.body)
			var msgs []string
			for _, m := range mustJSON(t, body).Get("errors.#.message").Array() {
				msgs = append(msgs, m.String())
			}
			if status != 400 || !strings.Contains(strings.Join(msgs, "\n"), tc.want) {
				t.Errorf("status %d: %s, want 400 with %q", status, body, tc.want)
			}
		})
	}
	if n := len(be.requests()); n != 0 {
		t.Errorf("backend saw %d requests", n)
	}
}
