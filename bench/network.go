package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tidwall/gjson"
)

const (
	netClients   = 8                      // client goroutines, and HTTP/1.1 connections
	netBatchSize = 100                    // operations per sync batch: the handler's default max_ops
	netPoll      = 100 * time.Millisecond // between an async job's progress polls
)

// network measures what batching saves over a network: n user creations
// through Caddy (batch → reverse_proxy → a backend), the client reaching
// Caddy only through a latencyProxy adding rtt, sent as separate requests,
// as sync batches over HTTP/1.1 and over h2c, and as one async job. Each
// scenario must create exactly n users, every one answered 201:
// `go run ./bench -network`.
func network(n int, rtt time.Duration) error {
	var created atomic.Int64
	backend, addr, err := serveBackend(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		w.Header().Set("Content-Type", "application/json")
		if r.Method != http.MethodPost || r.URL.Path != "/users" {
			_, _ = w.Write([]byte(`{}`))
			return
		}
		if !gjson.ValidBytes(body) || !gjson.GetBytes(body, "name").Exists() {
			w.WriteHeader(http.StatusBadRequest)
			_, _ = w.Write([]byte(`{"error":"a user needs a name"}`))
			return
		}
		id := created.Add(1)
		w.Header().Set("Location", "/users/"+strconv.FormatInt(id, 10))
		w.WriteHeader(http.StatusCreated)
		fmt.Fprintf(w, `{"id":%d}`, id)
	}))
	if err != nil {
		return err
	}
	defer backend.Close()
	// h2c beside h1, so that (c) can multiplex one connection; concurrency
	// and max_inflight stay at their defaults (10 and 32).
	r, cleanup, err := startRig("batch-network", `
	servers {
		protocols h1 h2c
	}
`, fmt.Sprintf(`
	batch /batch /batch/* {
		mode parallel
		async {
			retention 10m
		}
	}
	respond /ping "pong" 200
	reverse_proxy %s
`, addr), netClients, "/ping")
	if err != nil {
		return err
	}
	defer cleanup()
	base, direct := r.base, r.client
	proxy, err := startLatencyProxy(strings.TrimPrefix(base, "http://"), rtt)
	if err != nil {
		return err
	}
	defer proxy.Close() // before stop: its connections end first
	far := "http://" + proxy.Addr()
	pid := r.child.Process.Pid

	fmt.Printf("network: %d user creations (POST /users) through Caddy (batch, parallel, concurrency 10, max_inflight 32 → reverse_proxy → backend),\n"+
		"the client %d goroutines behind a latency proxy adding %s of RTT; %d CPUs, all on loopback\n", n, netClients, rtt, runtime.NumCPU())

	// The proxy adds the RTT: one small GET on a warm connection, direct
	// and through it. A delay line never delivers early, so less than the
	// RTT is a broken rig, not a fast machine.
	viaProxy := h1Client()
	directMed, err := medianGet(direct, base+"/ping")
	if err != nil {
		return err
	}
	proxyMed, err := medianGet(viaProxy, far+"/ping")
	viaProxy.CloseIdleConnections()
	if err != nil {
		return err
	}
	fmt.Printf("proxy check: one GET /ping, median of 5 on a warm connection: direct %s, through the proxy %s\n\n",
		directMed.Round(10*time.Microsecond), proxyMed.Round(10*time.Microsecond))
	if proxyMed < rtt {
		return fmt.Errorf("the proxy added %s, less than the RTT %s", proxyMed-directMed, rtt)
	}

	batches := (n + netBatchSize - 1) / netBatchSize
	scenarios := []struct {
		name, title string
		client      func() *http.Client
		do          func(*http.Client) (string, error)
	}{
		{"a", fmt.Sprintf("%d separate POST /users, HTTP/1.1", n), h1Client, func(c *http.Client) (string, error) {
			return "", separateCreations(c, far, n)
		}},
		{"b", fmt.Sprintf("%d batches of %d, HTTP/1.1", batches, netBatchSize), h1Client, func(c *http.Client) (string, error) {
			return "", batchCreations(c, far, n, 1)
		}},
		{"c", fmt.Sprintf("%d batches of %d, h2c", batches, netBatchSize), h2cClient, func(c *http.Client) (string, error) {
			return "", batchCreations(c, far, n, 2)
		}},
		{"d", fmt.Sprintf("one async job of %d", n), h1Client, func(c *http.Client) (string, error) {
			polls, err := jobCreations(c, far, n)
			plural := "s"
			if polls == 1 {
				plural = ""
			}
			return fmt.Sprintf("submit, %d poll%s every %s, NDJSON results", polls, plural, netPoll), err
		}},
	}
	fmt.Printf("%-38s %9s %14s %6s %10s\n", "scenario", "wall", "vs separate", "conns", "caddy CPU")
	var separate time.Duration
	for _, sc := range scenarios {
		client := sc.client()
		before, conns, cpu := created.Load(), proxy.accepted.Load(), cpuTime(pid)
		start := time.Now()
		note, err := sc.do(client)
		wall := time.Since(start)
		client.CloseIdleConnections()
		if err != nil {
			return fmt.Errorf("%s (%s): %w", sc.name, sc.title, err)
		}
		if got := created.Load() - before; got != int64(n) {
			return fmt.Errorf("%s (%s): the backend created %d users, not %d", sc.name, sc.title, got, n)
		}
		opened := proxy.accepted.Load() - conns
		if sc.name == "c" && opened != 1 {
			return fmt.Errorf("c (%s): %d connections, not one", sc.title, opened)
		}
		ratio := "1×"
		if sc.name == "a" {
			separate = wall
		} else {
			ratio = fmt.Sprintf("%.1f× faster", float64(separate)/float64(wall))
		}
		caddyCPU := "?"
		if c := cpuTime(pid); c >= 0 && cpu >= 0 {
			caddyCPU = fmt.Sprintf("%.2f s", (c - cpu).Seconds())
		}
		fmt.Printf("%-38s %8.2fs %14s %6d %10s", sc.name+"  "+sc.title, wall.Seconds(), ratio, opened, caddyCPU)
		if note != "" {
			fmt.Printf("  (%s)", note)
		}
		fmt.Println()
	}
	fmt.Printf("\nevery scenario: the backend created exactly %d users, every answer and result 201\n", n)
	return nil
}

// h1Client keeps at most netClients HTTP/1.1 connections, all kept alive.
func h1Client() *http.Client {
	return &http.Client{
		Transport: &http.Transport{MaxConnsPerHost: netClients, MaxIdleConnsPerHost: netClients},
		Timeout:   5 * time.Minute,
	}
}

// h2cClient speaks HTTP/2 without TLS (prior knowledge), multiplexing
// every request on one connection. MaxConnsPerHost 1: for HTTP/2 it limits
// the dials in flight, and without it the first requests, sent at once,
// each dial a connection of their own.
func h2cClient() *http.Client {
	var p http.Protocols
	p.SetUnencryptedHTTP2(true)
	return &http.Client{Transport: &http.Transport{Protocols: &p, MaxConnsPerHost: 1}, Timeout: 5 * time.Minute}
}

// medianGet is the median time of five GETs of url, after one that opens
// the connection.
func medianGet(c *http.Client, url string) (time.Duration, error) {
	var lat []time.Duration
	for i := range 6 {
		start := time.Now()
		if err := getOne(c, url); err != nil {
			return 0, err
		}
		if i > 0 {
			lat = append(lat, time.Since(start))
		}
	}
	slices.Sort(lat)
	return lat[len(lat)/2], nil
}

// spread calls do(i) for every i in [0, n) from netClients goroutines,
// and returns the first error, after which the others stop.
func spread(n int, do func(i int) error) error {
	var next atomic.Int64
	var failed atomic.Bool
	var once sync.Once
	var first error
	var wg sync.WaitGroup
	for range netClients {
		wg.Go(func() {
			for !failed.Load() {
				i := int(next.Add(1) - 1)
				if i >= n {
					return
				}
				if err := do(i); err != nil {
					once.Do(func() { first = err })
					failed.Store(true)
				}
			}
		})
	}
	wg.Wait()
	return first
}

// userBody is the user that creation i sends.
func userBody(i int) string { return fmt.Sprintf(`{"name":"user-%d"}`, i) }

// separateCreations sends n POST /users, each its own request.
func separateCreations(c *http.Client, base string, n int) error {
	return spread(n, func(i int) error {
		out, status, _, err := send(c, http.MethodPost, base+"/users", userBody(i), "", "")
		if err != nil {
			return err
		}
		if status != http.StatusCreated || !gjson.Get(out, "id").Exists() {
			return fmt.Errorf("creation %d answered %d: %.200s", i, status, out)
		}
		return nil
	})
}

// bulkBody is the native bulk form creating users [from, from+count).
func bulkBody(from, count int) string {
	var sb strings.Builder
	sb.WriteString(`{"operation":{"method":"POST","path":"/users"},"items":[`)
	for i := from; i < from+count; i++ {
		if i > from {
			sb.WriteByte(',')
		}
		sb.WriteString(userBody(i))
	}
	sb.WriteString(`]}`)
	return sb.String()
}

// batchCreations sends the n creations as sync batches of netBatchSize,
// checking that each came over HTTP/proto and every result is a 201.
func batchCreations(c *http.Client, base string, n, proto int) error {
	return spread((n+netBatchSize-1)/netBatchSize, func(b int) error {
		from := b * netBatchSize
		count := min(netBatchSize, n-from)
		req, err := http.NewRequest(http.MethodPost, base+"/batch", strings.NewReader(bulkBody(from, count)))
		if err != nil {
			return err
		}
		req.Header.Set("Content-Type", "application/json")
		resp, err := c.Do(req)
		if err != nil {
			return err
		}
		out, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			return err
		}
		if resp.ProtoMajor != proto {
			return fmt.Errorf("batch %d came over %s, not HTTP/%d", b, resp.Proto, proto)
		}
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("batch %d answered %d: %.200s", b, resp.StatusCode, out)
		}
		results := gjson.GetBytes(out, "results").Array()
		if len(results) != count {
			return fmt.Errorf("batch %d of %d answered %d results: %.200s", b, count, len(results), out)
		}
		for i, r := range results {
			if r.Get("status").Int() != http.StatusCreated || !r.Get("body.id").Exists() {
				return fmt.Errorf("batch %d, operation %d: %.200s", b, i, r.Raw)
			}
		}
		return nil
	})
}

// jobCreations submits the n creations as one async job, polls its
// progress every netPoll until it completes, then reads all its results as
// NDJSON; it returns how many polls it made.
func jobCreations(c *http.Client, base string, n int) (int, error) {
	const auth = "Bearer bench" // the job's owner
	out, status, loc, err := send(c, http.MethodPost, base+"/batch", bulkBody(0, n), auth, "respond-async")
	if err != nil {
		return 0, err
	}
	if status != http.StatusAccepted || loc == "" {
		return 0, fmt.Errorf("submit answered %d: %.200s", status, out)
	}
	last, polls, err := awaitJob(c, base, gjson.Get(out, "id").String(), auth, netPoll, 0)
	if err != nil {
		return polls, err
	}
	if last.Get("status").String() != "completed" || last.Get("succeeded").Int() != int64(n) {
		return polls, fmt.Errorf("job ended with %.300s", last.Raw)
	}
	req, err := http.NewRequest(http.MethodGet, base+loc+"/results", nil)
	if err != nil {
		return polls, err
	}
	req.Header.Set("Authorization", auth)
	req.Header.Set("Accept", "application/x-ndjson")
	resp, err := c.Do(req)
	if err != nil {
		return polls, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		b, _ := io.ReadAll(resp.Body)
		return polls, fmt.Errorf("results answered %d: %.200s", resp.StatusCode, b)
	}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	lines, summary := 0, false
	for sc.Scan() {
		line := gjson.ParseBytes(sc.Bytes())
		if line.Get("summary").Bool() {
			if summary || lines != n || line.Get("succeeded").Int() != int64(n) {
				return polls, fmt.Errorf("summary after %d results: %.300s", lines, line.Raw)
			}
			summary = true
			continue
		}
		if line.Get("index").Int() != int64(lines) || line.Get("status").Int() != http.StatusCreated || !line.Get("body.id").Exists() {
			return polls, fmt.Errorf("result %d: %.300s", lines, line.Raw)
		}
		lines++
	}
	if err := sc.Err(); err != nil {
		return polls, err
	}
	if !summary {
		return polls, errors.New("the results ended without their summary line")
	}
	return polls, nil
}

// cpuTime is the user and system CPU time a process has used, from
// /proc/<pid>/stat (utime and stime, in clock ticks of 1/100 s: USER_HZ is
// 100 on every Linux this runs on, and Go cannot ask sysconf without cgo);
// -1 when it cannot be read.
func cpuTime(pid int) time.Duration {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return -1
	}
	// The command name, in parentheses, may hold spaces: count from after it.
	i := strings.LastIndexByte(string(b), ')')
	f := strings.Fields(string(b[i+1:]))
	if i < 0 || len(f) < 13 {
		return -1
	}
	utime, err1 := strconv.ParseInt(f[11], 10, 64) // field 14
	stime, err2 := strconv.ParseInt(f[12], 10, 64) // field 15
	if err1 != nil || err2 != nil {
		return -1
	}
	return time.Duration(utime+stime) * 10 * time.Millisecond
}
