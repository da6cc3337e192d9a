package batch

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// A job's results wait in memory until about 1 MiB, not until 100 of
// them: 24 answers of 1 MB do not make a job hold 24 MB, and readers of
// its results hold one stored part each, not a chunk of 100.
func TestAsyncResultsFlushedBySize(t *testing.T) {
	const n, size = 24, 1_000_000
	payload := bytes.Repeat([]byte("x"), size-1000) // headers count too
	var (
		mu      sync.Mutex
		on      bool
		between []uint64 // live heap as each operation reaches the backend
	)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		if on {
			between = append(between, liveHeap())
		}
		mu.Unlock()
		w.Header().Set("Content-Type", "text/plain")
		_, _ = w.Write(payload)
	}))
	t.Cleanup(srv.Close)
	storage := t.TempDir()
	base := startCaddy(t, fmt.Sprintf(`
	batch /batch /batch/* {
		max_response_size 1MB
		async {
			workers 1
		}
	}
	reverse_proxy %s`, srv.Listener.Addr()), inStorage(storage))

	ops := "[" + strings.TrimSuffix(strings.Repeat(`{"path":"/blob"},`, n), ",") + "]"
	waitJob(t, base+"/batch/"+submitJob(t, base+"/batch", `[{"path":"/blob"}]`), alice, "completed") // warm-up
	before := liveHeap()
	mu.Lock()
	on = true
	mu.Unlock()
	id := submitJob(t, base+"/batch", ops)
	p := waitJob(t, base+"/batch/"+id, alice, "completed")
	mu.Lock()
	on = false
	samples := between
	mu.Unlock()
	if p.Get("succeeded").Int() != n || len(samples) != n {
		t.Fatalf("job %s, %d samples", p.Raw, len(samples))
	}
	var peak int64
	for _, s := range samples {
		peak = max(peak, int64(s)-int64(before))
	}
	t.Logf("job of %d answers of %d bytes: live heap grew at most %.1f MiB", n, size, float64(peak)/(1<<20))
	// One part (≤ 1 MiB plus one result), the answer being captured and
	// its encoding: a few MB. Buffering 100 results would hold all 24.
	if peak > 16<<20 {
		t.Errorf("live heap grew %d MiB while the job ran", peak>>20)
	}

	// Stored parts are bounded, and a page may start inside any part.
	var largest int64
	_ = filepath.WalkDir(filepath.Join(storage, "batch", "jobs", id, "results"), func(_ string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			if fi, err := d.Info(); err == nil {
				largest = max(largest, fi.Size())
			}
		}
		return nil
	})
	if largest == 0 || largest > 1<<20+size+1000 {
		t.Errorf("largest stored part: %d bytes", largest)
	}
	_, _, body := send(t, "GET", base+"/batch/"+id+"/results?offset=17&limit=3", "", alice)
	page := mustJSON(t, body).Get("results").Array()
	if len(page) != 3 || page[0].Get("id").String() != "17" || page[2].Get("id").String() != "19" {
		t.Errorf("page 17+3: %.200s", body)
	}

	// Two readers each read half of the results, then stop reading: the
	// handlers serving them hold what they have loaded.
	const readers = 2
	before = liveHeap()
	var read, done sync.WaitGroup
	release := make(chan struct{})
	counts := make([]*resultCounter, readers)
	for i := range readers {
		read.Add(1)
		done.Add(1)
		req := request(t, "GET", base+"/batch/"+id+"/results", "", alice)
		go func() {
			defer done.Done()
			resp, err := client.Do(req)
			if err != nil {
				read.Done()
				t.Error(err)
				return
			}
			defer resp.Body.Close()
			c := &resultCounter{}
			counts[i] = c
			_, err = io.CopyN(c, resp.Body, n*size/2)
			read.Done()
			if err != nil {
				t.Error(err)
				return
			}
			<-release
			_, _ = io.Copy(c, resp.Body)
		}()
	}
	waitGroup(t, 40*time.Second, "the readers to read half of the results", &read)
	var held int64
	for range 3 {
		held = max(held, int64(liveHeap())-int64(before))
		time.Sleep(20 * time.Millisecond)
	}
	close(release)
	waitGroup(t, 40*time.Second, "the readers to read the rest", &done)
	t.Logf("%d readers paused halfway: live heap grew %.1f MiB", readers, float64(held)/(1<<20))
	if held > readers*6<<20 { // each holds one part; a chunk of 100 would be all 24 MB
		t.Errorf("%d paused readers hold %d MiB", readers, held>>20)
	}
	for i, c := range counts {
		if c != nil && (c.results != n || c.last != '}') {
			t.Errorf("reader %d: %d results, %d bytes", i, c.results, c.n)
		}
	}
}

// failureRequestBatches hold operations of every shape a request takes.
var failureRequestBatches = []string{
	`{"mode":"parallel","batch":[
		{"id":"a","method":"POST","path":"/u?x=1","headers":{"X-T":"t","Accept":["a","b"]},"body":{"n":1}},
		{"id":"s","method":"PUT","path":"/s","headers":{"Content-Type":"application/json"},"body":"\"quoted\""},
		{"id":"nul","method":"POST","path":"/n","headers":{"Content-Type":"application/json"},"body":"null"},
		{"id":"n","method":"POST","path":"/n","body":5},
		{"id":"t","method":"POST","path":"/t","body":"plain {{a.status}}"},
		{"id":"bin","method":"POST","path":"/b","body":"AAH/","body_encoding":"base64"},
		{"id":"r","method":"POST","path":"/r/{{a.body.id}}","body":{"ref":"{{a.body}}"},"if":"succeeded(a) && status(s) != 404","key":"k1"}]}`,
	`{"atomicity":"all_or_nothing","batch":[
		{"id":"rb","method":"POST","path":"/x","body":{"a":1},"rollback":{"method":"DELETE","path":"/x/{{rb.body.id}}","headers":{"X-Undo":"1"}}},
		{"path":"/y","depends_on":"rb"}]}`,
}

// The request the failures stream keeps of an operation, sent again as
// a native batch, is that operation: the same method, target, headers,
// body bytes (a JSON string or null sent as JSON, repeated headers),
// dependencies, condition, key and rollback.
func TestFailureRequestIsTheOperation(t *testing.T) {
	lim := ptLimits(t, nil)
	for _, body := range failureRequestBatches {
		orig := ptParse(t, lim, body)
		again := []byte(`{"batch":[`)
		for i, op := range orig.ops {
			if i > 0 {
				again = append(again, ',')
			}
			again = appendRequest(again, op, orig.ops)
		}
		again = append(again, `],"atomicity":"`+orig.atomicity+`","mode":"`+orig.mode+`"}`...)
		b, err := parseBatch(context.Background(), again, lim)
		if err != nil {
			t.Fatalf("%s\nsent again as %s: %v", body, again, err)
		}
		for i, o := range orig.ops {
			if d := sameOperation(o, b.ops[i]); d != "" {
				t.Errorf("%s sent again differs: %s", o.id, d)
			}
		}
	}
}

// sameOperation says how r differs from o, "" when it does not.
func sameOperation(o, r *operation) string {
	switch {
	case r.id != o.id || r.method != o.method || r.target != o.target || r.key != o.key:
		return fmt.Sprintf("%s %s %s %s", r.id, r.method, r.target, r.key)
	case !reflect.DeepEqual(r.header, o.header):
		return fmt.Sprintf("headers %v", r.header)
	case !bytes.Equal(r.body, o.body):
		return fmt.Sprintf("body %q", r.body)
	case !slices.Equal(slices.Sorted(slices.Values(r.deps)), slices.Sorted(slices.Values(o.deps))):
		return fmt.Sprintf("deps %v", r.deps)
	case (r.cond == nil) != (o.cond == nil) || r.cond != nil && !reflect.DeepEqual(r.cond.steps, o.cond.steps):
		return fmt.Sprintf("if %v", r.cond)
	case (r.rollback == nil) != (o.rollback == nil):
		return fmt.Sprintf("rollback %v", r.rollback)
	case o.rollback != nil:
		if d := sameOperation(o.rollback, r.rollback); d != "" {
			return "rollback: " + d
		}
	}
	return ""
}
