package batch

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestQueueNames(t *testing.T) {
	rec := jobRecord{progress: progress{ID: strings.Repeat("ab", 16), CreatedAt: time.Unix(1700000000, 123456789)},
		Owner: "v2:0123", ExpiresAt: time.Unix(1700086400, 5)}
	name := queueName(rec)
	q, ok := parseQueued(name)
	if !ok || q.id != rec.ID || !q.created.Equal(rec.CreatedAt) || !q.expires.Equal(rec.ExpiresAt) || q.owner != ownerToken(rec.Owner) {
		t.Fatalf("%s read back as %+v, %v", name, q, ok)
	}
	if q.key() != queueKey(rec) {
		t.Errorf("key %s, want %s", q.key(), queueKey(rec))
	}
	// Names sort by owner, then age.
	later := rec
	later.CreatedAt = rec.CreatedAt.Add(time.Hour * 24 * 365 * 30)
	if queueName(later) <= name {
		t.Errorf("%s sorts before %s", queueName(later), name)
	}
	for _, bad := range []string{
		"", "123", name + ".x", strings.Replace(name, ".", "", 1),
		"zzzzzzzzzzzzzzzz" + name[16:],       // owner not hex
		name[:17] + "x" + name[18:],          // created not a number
		name[:len(name)-1] + "g",             // id not hex
		name[:17] + "-" + name[18:],          // negative
		"0123456789abcdef.1.2." + rec.ID,     // fields not fixed in width
		"." + strings.Repeat("0", 70) + ".x", // nothing in its place
	} {
		if q, ok := parseQueued(bad); ok {
			t.Errorf("%q read as %+v", bad, q)
		}
	}
}

// The jobs waiting are served in a round over their owners, from the owner
// after the one served last, each owner's jobs oldest first.
func TestQueueRounds(t *testing.T) {
	at := func(s int) time.Time { return time.Unix(1700000000+int64(s), 0) }
	job := func(owner string, created int, id string) queued {
		return queued{owner: owner, created: at(created), id: strings.Repeat(id, 32)}
	}
	// a's jobs came first, then b's, then c's: first come, first served
	// would run all of a's before any other.
	waiting := []queued{job("b", 5, "4"), job("a", 1, "1"), job("c", 7, "6"), job("a", 3, "3"), job("b", 6, "5"), job("a", 2, "2")}
	order := func(r *rounds) (got []string) {
		for {
			q, ok := r.next()
			if !ok {
				return got
			}
			got = append(got, q.owner+q.id[:1])
		}
	}
	cases := []struct {
		turn string
		want []string
	}{
		{"", []string{"a1", "b4", "c6", "a2", "b5", "a3"}},
		{"a", []string{"b4", "c6", "a1", "b5", "a2", "a3"}},
		{"b", []string{"c6", "a1", "b4", "a2", "b5", "a3"}},
		{"c", []string{"a1", "b4", "c6", "a2", "b5", "a3"}},
		{"bb", []string{"c6", "a1", "b4", "a2", "b5", "a3"}}, // an owner with nothing waiting
		{"z", []string{"a1", "b4", "c6", "a2", "b5", "a3"}},
	}
	for _, tc := range cases {
		if got := order(newRounds(waiting, tc.turn)); !slices.Equal(got, tc.want) {
			t.Errorf("after %q: %v, want %v", tc.turn, got, tc.want)
		}
	}

	// An owner whose next job cannot start now is passed over for the
	// rest of the look: its later jobs must not start before it.
	r := newRounds(waiting, "")
	q, _ := r.next() // a1 cannot start
	r.skip(q.owner)
	if got := order(r); !slices.Equal(got, []string{"b4", "c6", "b5"}) {
		t.Errorf("with a's first job waiting: %v", got)
	}
	// A job that was none to run gives its turn to its owner's next.
	r = newRounds(waiting, "")
	r.next() // a1 was none to run
	r.again()
	if got := order(r); !slices.Equal(got, []string{"a2", "b4", "c6", "a3", "b5"}) {
		t.Errorf("with a's first job passed: %v", got)
	}
	// Jobs of one owner created at once keep an order: by id.
	tie := newRounds([]queued{job("a", 1, "9"), job("a", 1, "8")}, "")
	if got := order(tie); !slices.Equal(got, []string{"a8", "a9"}) {
		t.Errorf("jobs created at once: %v", got)
	}
}

// startedOps lists, in order, the ids of the /slow and /hold operations
// that reached be.
func startedOps(be *backend) []string {
	var ids []string
	for _, e := range be.eventLog() {
		if id, ok := strings.CutPrefix(e, "start "); ok {
			ids = append(ids, id)
		}
	}
	return ids
}

// holding counts the /hold operations be holds now (their ids start with
// "hold").
func holding(be *backend) int {
	n := 0
	for _, e := range be.eventLog() {
		switch {
		case strings.HasPrefix(e, "start hold"):
			n++
		case strings.HasPrefix(e, "end hold"):
			n--
		}
	}
	return n
}

// A job queued on an instance whose workers are all busy is started by an
// instance sharing its storage that has a worker free, while the busy one
// is still busy.
func TestQueuedJobStartsOnIdleInstance(t *testing.T) {
	be := newBackend(t)
	// /pin keeps its jobs where they are taken (no credentials_key: what
	// they inherit stays in memory); /batch's wait in the cluster's queue.
	a, b, _ := twoCaddies(t, t.TempDir(), fmt.Sprintf(`
	batch /pin /pin/* {
		async {
			workers 1
			lease 1s
		}
	}
	batch /batch /batch/* {
		async {
			workers 1
			lease 1s
			credentials_key %s
		}
	}
	reverse_proxy %s`, testKey, be.addr()))

	// The child's one worker runs a job only it can run.
	submitJob(t, b+"/pin", `[{"path":"/hold?id=hold-pinned"}]`)
	eventually(t, 10*time.Second, "the child's worker busy", func() bool { return holding(be) == 1 })
	start := time.Now()
	id := submitJob(t, b+"/batch", `[{"path":"/slow?id=queued"}]`)
	p := waitJob(t, a+"/batch/"+id, alice, "completed", "error")
	waited := time.Since(start)
	if p.Get("status").String() != "completed" || !slices.Equal(startedOps(be), []string{"hold-pinned", "queued"}) {
		t.Fatalf("the queued job: %s; started %v", p.Raw, startedOps(be))
	}
	// Still held: the job did not wait for the child's worker.
	if holding(be) != 1 {
		t.Fatalf("%d requests held", holding(be))
	}
	t.Logf("the job queued on the busy instance ended %v after it was submitted", waited.Round(time.Millisecond))
}

// Jobs waiting are started in a round over their owners, not first come
// first served, and each owner's jobs in the order they were submitted.
func TestOwnersServedInTurn(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, fmt.Sprintf(`
	batch /batch /batch/* {
		async {
			workers 1
			credentials_key %s
		}
	}
	reverse_proxy %s`, testKey, be.addr()))
	submit := func(owner, body string) {
		t.Helper()
		status, _, resp := send(t, "POST", base+"/batch", body, "Authorization: Bearer "+owner, "Prefer: respond-async")
		if status != 202 {
			t.Fatalf("submit %s: %d %s", body, status, resp)
		}
	}
	submit("z", `[{"path":"/hold?id=hold"}]`)
	eventually(t, 10*time.Second, "the worker busy", func() bool { return holding(be) == 1 })
	// First come, first served would run all of a's before b's and c's.
	for _, op := range []string{"a1", "a2", "a3", "b1", "b2", "c1"} {
		submit(op[:1], `[{"path":"/slow?id=`+op+`"}]`)
	}
	be.release()
	eventually(t, 20*time.Second, "every job run", func() bool { return len(startedOps(be)) == 7 })
	got := startedOps(be)[1:]
	t.Logf("started in the order %v", got)
	// A round of one job of each owner, then of each owner with jobs
	// left, each in the order the first round took, each owner's jobs in
	// the order they came.
	at := 0
	var turns []byte
	for k, round := range [][]string{{"a1", "b1", "c1"}, {"a2", "b2"}, {"a3"}} {
		part := got[at : at+len(round)]
		at += len(round)
		if sorted := slices.Sorted(slices.Values(part)); !slices.Equal(sorted, round) {
			t.Fatalf("round %d started %v, want %v in some order (all: %v)", k, part, round, got)
		}
		if k == 0 {
			turns = ownersOf(part)
			continue
		}
		var want []byte
		for _, o := range turns {
			if slices.Contains(ownersOf(part), o) {
				want = append(want, o)
			}
		}
		if !slices.Equal(ownersOf(part), want) {
			t.Errorf("round %d served the owners %s, after %s in the first (all: %v)", k, ownersOf(part), turns, got)
		}
	}
}

func ownersOf(ops []string) []byte {
	var o []byte
	for _, op := range ops {
		o = append(o, op[0])
	}
	return o
}

// max_queued bounds the jobs one instance has taken that wait, also when
// they wait in the cluster's queue: beyond, 503 and Retry-After; once
// another instance has taken one, there is room again.
func TestMaxQueuedCountsClusterQueue(t *testing.T) {
	setVar(t, &jobsGrace, 50*time.Millisecond) // the job held at the end is handed over
	be := newBackend(t)
	storage := t.TempDir()
	site := fmt.Sprintf(`
	batch /batch /batch/* {
		async {
			workers 1
			max_queued 2
			lease 1s
			credentials_key %s
		}
	}
	reverse_proxy %s`, testKey, be.addr())
	base := startCaddy(t, site, inStorage(storage))
	submitJob(t, base+"/batch", `[{"path":"/hold?id=hold1"}]`)
	eventually(t, 10*time.Second, "the worker busy", func() bool { return holding(be) == 1 })
	submitJob(t, base+"/batch", `[{"path":"/hold?id=hold2"}]`)
	submitJob(t, base+"/batch", `[{"path":"/slow?id=third"}]`)
	status, hdr, body := send(t, "POST", base+"/batch", `[{"path":"/slow?id=refused"}]`, alice, "Prefer: respond-async")
	if status != 503 || hdr.Get("Retry-After") == "" {
		t.Fatalf("a third job waiting: %d %v %s", status, hdr, body)
	}
	// Another instance takes the oldest waiting, and is busy with it.
	port := freePort(t)
	startChild(t, testCaddyfile(storage, port, "", site), port)
	eventually(t, 10*time.Second, "the other instance busy", func() bool { return holding(be) == 2 })
	eventually(t, 10*time.Second, "room in the queue again", func() bool {
		status, _, _ := send(t, "POST", base+"/batch", `[{"path":"/slow?id=fourth"}]`, alice, "Prefer: respond-async")
		return status == 202
	})
}
