package batch

import (
	"bufio"
	"bytes"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tidwall/gjson"
)

// A client that sends headers announcing a 10 MB batch and then trickles it
// is cut off by the server's read_body timeout: the batch answers in time,
// saying why, and nothing runs.
func TestSlowBodyCutOffByReadTimeout(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, proxySite(be, ""), withGlobal(`servers {
		timeouts {
			read_body 500ms
		}
	}`))
	host := strings.TrimPrefix(base, "http://")

	conn, err := net.Dial("tcp", host)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	start := time.Now()
	fmt.Fprintf(conn, "POST /batch HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\nContent-Length: 10000000\r\n\r\n[", host)
	stop := make(chan struct{})
	trickled := make(chan int)
	go func() {
		n := 0
		defer func() { trickled <- n }()
		for {
			select {
			case <-stop:
				return
			case <-time.After(100 * time.Millisecond):
			}
			if _, err := io.WriteString(conn, `{"path":"/users"},`); err != nil {
				return
			}
			n++
		}
	}()
	_ = conn.SetReadDeadline(start.Add(5 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	elapsed := time.Since(start)
	close(stop)
	n := receive(t, 5*time.Second, "the trickling writer to stop", trickled)
	t.Logf("answered after %v, %d pieces trickled", elapsed.Round(time.Millisecond), n)
	if elapsed > 3*time.Second {
		t.Errorf("server took %v to give up on a slow body; read_body is 500ms", elapsed)
	}
	if len(be.requests()) != 0 {
		t.Errorf("backend saw %d requests from an unfinished batch", len(be.requests()))
	}
	if err != nil {
		t.Fatalf("no answer, the connection was just dropped: %v", err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != http.StatusRequestTimeout || !strings.Contains(gjson.GetBytes(body, "error").String(), "time") {
		t.Errorf("got %d %q; want 408 with a JSON error that names the timeout", resp.StatusCode, body)
	}
}

// A sequential batch streams its results: however many operations it has,
// it holds about one answer at a time, not max_ops of them.
func TestSequentialBatchMemoryBounded(t *testing.T) {
	const (
		maxOps  = 30
		maxResp = 1_000_000 // "1MB" in a Caddyfile is SI
	)
	// The answer's headers count against max_response_size too: leave them 1 KB.
	payload := bytes.Repeat([]byte("x"), maxResp-1000)
	var (
		mu      sync.Mutex
		between []uint64 // live heap as each operation reaches the backend
	)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		if heapProbe.on {
			// What the batch still holds of operations 0..i-1 as i starts.
			between = append(between, liveHeap())
		}
		mu.Unlock()
		w.Header().Set("Content-Type", "text/plain")
		_, _ = w.Write(payload)
	}))
	t.Cleanup(srv.Close)
	base := startCaddy(t, fmt.Sprintf(`
	batch /batch {
		mode sequential
		max_ops %d
		max_response_size 1MB
	}
	route {
		test_heap_probe
		reverse_proxy %s
	}`, maxOps, srv.Listener.Addr()))

	ops := "[" + strings.TrimSuffix(strings.Repeat(`{"path":"/blob"},`, maxOps), ",") + "]"
	send := func(ops string, n int) *resultCounter {
		t.Helper()
		// What the batch holds, not a compressor's.
		resp, err := client.Do(request(t, "POST", base+"/batch", ops, "Accept-Encoding: identity"))
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		c := &resultCounter{} // counts the streamed answer without keeping it
		if _, err := io.Copy(c, resp.Body); err != nil {
			t.Fatal(err)
		}
		if resp.StatusCode != 200 || c.results != n || c.succeeded != n || c.last != ']' {
			t.Fatalf("status %d, %d results, %d succeeded, %d bytes", resp.StatusCode, c.results, c.succeeded, c.n)
		}
		return c
	}
	send(`[{"path":"/blob"}]`, 1) // warm-up: connections, buffer pools, lazily built state

	before := liveHeap()
	heapProbe.Lock()
	heapProbe.on, heapProbe.samples = true, nil
	heapProbe.Unlock()
	c := send(ops, maxOps)
	heapProbe.Lock()
	heapProbe.on = false
	captured := heapProbe.samples
	heapProbe.Unlock()
	mu.Lock()
	defer mu.Unlock()
	if len(between) != maxOps || len(captured) != maxOps {
		t.Fatalf("%d and %d samples, want %d", len(between), len(captured), maxOps)
	}
	// Growth over the heap before the batch: the largest, and the average
	// over the first ten operations after op 0 (which starts before the
	// batch holds anything) and over the last ten.
	growth := func(samples []uint64) (peak, first, last int64) {
		for i, s := range samples {
			g := int64(s) - int64(before)
			peak = max(peak, g)
			switch {
			case i >= 1 && i <= 10:
				first += g / 10
			case i >= len(samples)-10:
				last += g / 10
			}
		}
		return peak, first, last
	}
	held, heldFirst, heldLast := growth(between)
	peak, _, _ := growth(captured)
	t.Logf("answer %d MB; live heap before %.1f MB; between operations +%.1f MB at most (+%.1f on average over the first ten, +%.1f over the last ten); with an answer captured +%.1f MB at most",
		c.n/1e6, float64(before)/1e6, float64(held)/1e6, float64(heldFirst)/1e6, float64(heldLast)/1e6, float64(peak)/1e6)

	// Between operations the batch may hold the buffer that encodes a result
	// and the buffer the HTTP sink copies it into, each about
	// max_response_size ('x' needs no escaping) and up to 1.25x from
	// append's growth: 2.5x. The previous answer's capture buffer may still
	// be reachable for a moment (the samples are bimodal, 1x apart): 3.5x.
	// Add 1.5x for what else is live while a request is in flight in this
	// process (sub-request and proxy state, connection buffers, Caddy's
	// lazily built state): 5x. Holding the answers instead would grow by 1x
	// per operation, to 29x.
	if held > 5*maxResp {
		t.Errorf("between operations the live heap grew up to %.1f MB; bound %d MB", float64(held)/1e6, 5*maxResp/1_000_000)
	}
	// Streaming: what is held does not grow with the operations. Keeping
	// each answer would put the last ten 20 MB above the first ten.
	if heldLast-heldFirst > 2*maxResp {
		t.Errorf("held memory grows with the operations: +%.1f MB over the first ten, +%.1f MB over the last ten", float64(heldFirst)/1e6, float64(heldLast)/1e6)
	}
	// With an operation's answer captured whole: add its buffer (up to 2x,
	// as append grows it by doubling while the answer is small): 7x.
	if peak > 7*maxResp {
		t.Errorf("with an answer captured the live heap grew up to %.1f MB; bound %d MB", float64(peak)/1e6, 7*maxResp/1_000_000)
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
