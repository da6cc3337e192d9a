package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"os"
	"os/exec"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tidwall/gjson"
)

// soak holds a mixed load against a real Caddy for d: sync batches (some
// with failing operations), async jobs followed to their results, and
// idempotent repeats. It reports what was served, the errors, latency, and
// Caddy's memory and goroutines at start and end (after the load, idle).
func soak(d time.Duration, concurrency int) error {
	backend, addr, err := startBackend()
	if err != nil {
		return err
	}
	defer backend.Close()
	r, cleanup, err := startRig("batch-soak", "", fmt.Sprintf(`
	metrics /metrics
	batch /batch /batch/* {
		mode parallel
		concurrency 8
		max_ops 1000
		async {
			workers 4
			retention 10m
		}
	}
	reverse_proxy %s
`, addr), concurrency, "/metrics")
	if err != nil {
		return err
	}
	defer cleanup()
	child, base, client := r.child, r.base, r.client
	startGo, startRSS := caddyGauges(client, base)
	fmt.Printf("soak: %s, %d client goroutines, mixed sync/async/idempotent batches\n", d, concurrency)
	fmt.Printf("caddy at start: %s RSS (peak %s), %s goroutines\n", startRSS, vmHWM(child.Process.Pid), startGo)

	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	var (
		served, errs atomic.Int64
		mu           sync.Mutex
		syncLat      []time.Duration
		asyncLat     []time.Duration
		firstErrs    []string
		wg           sync.WaitGroup
	)
	fail := func(err error) {
		errs.Add(1)
		mu.Lock()
		if len(firstErrs) < 5 {
			firstErrs = append(firstErrs, err.Error())
		}
		mu.Unlock()
	}
	for w := range concurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 1))
			auth := "Bearer client-" + strconv.Itoa(w)
			for ctx.Err() == nil {
				start := time.Now()
				var err error
				var async bool
				switch x := rng.IntN(10); {
				case x < 7:
					err = soakSync(client, base, auth, rng)
				case x < 9:
					async = true
					err = soakAsync(ctx, client, base, auth, rng)
				default:
					err = soakIdempotent(client, base, auth, rng)
				}
				if ctx.Err() != nil && err != nil {
					return // cut off by the end of the soak
				}
				if err != nil {
					fail(err)
					continue
				}
				served.Add(1)
				mu.Lock()
				if async {
					asyncLat = append(asyncLat, time.Since(start))
				} else {
					syncLat = append(syncLat, time.Since(start))
				}
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	client.CloseIdleConnections()
	// Idle: file-system storage locks (idempotency keys) keep a goroutine
	// up to 5 s after they are released; the proxy's idle keep-alive
	// connections (2 goroutines each) stay, as they should.
	time.Sleep(6 * time.Second)
	endGo, endRSS := caddyGauges(client, base)

	pct := func(lat []time.Duration, p float64) time.Duration {
		if len(lat) == 0 {
			return 0
		}
		slices.Sort(lat)
		return lat[min(len(lat)-1, int(float64(len(lat))*p))].Round(time.Microsecond)
	}
	fmt.Printf("requests served: %d (sync and idempotent batches %d, async jobs followed to results %d), errors: %d\n",
		served.Load(), len(syncLat), len(asyncLat), errs.Load())
	fmt.Printf("sync batch latency p50 %s p99 %s; async job submit-to-results p50 %s p99 %s\n",
		pct(syncLat, 0.5), pct(syncLat, 0.99), pct(asyncLat, 0.5), pct(asyncLat, 0.99))
	fmt.Printf("caddy at end: %s RSS (peak %s), %s goroutines\n", endRSS, vmHWM(child.Process.Pid), endGo)
	for _, e := range firstErrs {
		fmt.Println("error:", e)
	}
	if errs.Load() > 0 {
		return fmt.Errorf("%d errors", errs.Load())
	}
	return nil
}

// soakSync sends a batch of 5 to 50 operations, some failing on purpose.
func soakSync(client *http.Client, base, auth string, rng *rand.Rand) error {
	n := 5 + rng.IntN(46)
	var sb strings.Builder
	sb.WriteString(`{"batch":[`)
	want404 := 0
	for i := range n {
		if i > 0 {
			sb.WriteByte(',')
		}
		if rng.IntN(10) == 0 {
			sb.WriteString(`{"path":"/missing"}`)
			want404++
		} else {
			fmt.Fprintf(&sb, `{"method":"POST","path":"/users/%d","body":{"name":"u%d"}}`, i, i)
		}
	}
	sb.WriteString(`]}`)
	out, status, _, err := send(client, http.MethodPost, base+"/batch", sb.String(), auth, "")
	if err != nil {
		return err
	}
	if status != 200 || gjson.Get(out, "total").Int() != int64(n) || gjson.Get(out, "failed").Int() != int64(want404) {
		return fmt.Errorf("sync batch: %d %.200s", status, out)
	}
	return nil
}

// soakAsync submits a job of 20 to 200 operations and follows it to its
// results.
func soakAsync(ctx context.Context, client *http.Client, base, auth string, rng *rand.Rand) error {
	n := 20 + rng.IntN(181)
	body := fmt.Sprintf(`{"operation":{"method":"POST","path":"/users"},"items":[%s]}`,
		strings.TrimSuffix(strings.Repeat(`{"name":"x"},`, n), ","))
	out, status, loc, err := send(client, http.MethodPost, base+"/batch", body, auth, "respond-async")
	if err != nil {
		return err
	}
	if status != 202 || loc == "" {
		return fmt.Errorf("async submit: %d %.200s", status, out)
	}
	for {
		out, status, _, err = send(client, http.MethodGet, base+loc, "", auth, "")
		if err != nil {
			return err
		}
		if status != 200 {
			return fmt.Errorf("async progress: %d %.200s", status, out)
		}
		if s := gjson.Get(out, "status").String(); s == "completed" {
			break
		} else if s != "queued" && s != "running" {
			return fmt.Errorf("async job ended %s: %.200s", s, out)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	out, status, _, err = send(client, http.MethodGet, base+loc+"/results", "", auth, "")
	if err != nil {
		return err
	}
	if status != 200 || len(gjson.Get(out, "results").Array()) != n || gjson.Get(out, "succeeded").Int() != int64(n) {
		return fmt.Errorf("async results: %d %.200s", status, out)
	}
	return nil
}

// soakIdempotent sends the same keyed batch twice: the second is replayed.
func soakIdempotent(client *http.Client, base, auth string, rng *rand.Rand) error {
	key := strconv.FormatUint(rng.Uint64(), 36)
	body := `[{"method":"POST","path":"/users","body":{"name":"once"}}]`
	req := func() (string, int, http.Header, error) {
		r, _ := http.NewRequest(http.MethodPost, base+"/batch", strings.NewReader(body))
		r.Header.Set("Content-Type", "application/json")
		r.Header.Set("Authorization", auth)
		r.Header.Set("Idempotency-Key", key)
		resp, err := client.Do(r)
		if err != nil {
			return "", 0, nil, err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		return string(b), resp.StatusCode, resp.Header, err
	}
	first, s1, _, err := req()
	if err != nil {
		return err
	}
	again, s2, h, err := req()
	if err != nil {
		return err
	}
	if s1 != 200 || s2 != 200 || first != again || h.Get("Idempotent-Replayed") != "true" {
		return fmt.Errorf("idempotent repeat: %d %d %q", s1, s2, again)
	}
	return nil
}

func send(client *http.Client, method, url, body, auth, prefer string) (string, int, string, error) {
	var rd io.Reader
	if body != "" {
		rd = strings.NewReader(body)
	}
	req, err := http.NewRequest(method, url, rd)
	if err != nil {
		return "", 0, "", err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Authorization", auth)
	if prefer != "" {
		req.Header.Set("Prefer", prefer)
	}
	resp, err := client.Do(req)
	if err != nil {
		return "", 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), resp.StatusCode, resp.Header.Get("Location"), err
}

var gauge = regexp.MustCompile(`(?m)^(go_goroutines|process_resident_memory_bytes) (\S+)$`)

// caddyGauges reads Caddy's goroutine count and resident memory from its
// metrics endpoint.
func caddyGauges(client *http.Client, base string) (goroutines, rss string) {
	out, _, _, err := send(client, http.MethodGet, base+"/metrics", "", "", "")
	if err != nil {
		return "?", "?"
	}
	goroutines, rss = "?", "?"
	for _, m := range gauge.FindAllStringSubmatch(out, -1) {
		switch m[1] {
		case "go_goroutines":
			goroutines = m[2]
		case "process_resident_memory_bytes":
			if f, err := strconv.ParseFloat(m[2], 64); err == nil {
				rss = fmt.Sprintf("%.1f MiB", f/(1<<20))
			}
		}
	}
	return goroutines, rss
}

// launch runs cfg, listening on port, in a child process of this binary,
// and waits until probe answers; it returns the child, its base URL, a
// client for it with room for concurrency connections, and what stops it.
func launch(cfg string, port, concurrency int, probe string) (*exec.Cmd, string, *http.Client, func(), error) {
	args := []string{"-serve", cfg}
	if cpuProfile != "" {
		args = append(args, "-cpuprofile", cpuProfile)
	}
	child := exec.Command(os.Args[0], args...)
	child.Stderr = os.Stderr
	stdin, err := child.StdinPipe()
	if err != nil {
		return nil, "", nil, nil, err
	}
	if err := child.Start(); err != nil {
		return nil, "", nil, nil, err
	}
	stop := func() { stdin.Close(); _ = child.Wait() }
	base := fmt.Sprintf("http://127.0.0.1:%d", port)
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: concurrency * 2}, Timeout: 60 * time.Second}
	for range 100 {
		if resp, err := client.Get(base + probe); err == nil {
			resp.Body.Close()
			return child, base, client, stop, nil
		}
		time.Sleep(50 * time.Millisecond)
	}
	stop()
	return nil, "", nil, nil, errors.New("caddy did not start")
}

// startBackend serves a fast JSON API: 404 for /missing, a 10 ms wait for
// /slow, 200 for anything else.
func startBackend() (*http.Server, string, error) {
	return serveBackend(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "application/json")
		switch {
		case r.URL.Path == "/missing":
			w.WriteHeader(http.StatusNotFound)
			_, _ = w.Write([]byte(`{"error":"not found"}`))
			return
		case strings.HasPrefix(r.URL.Path, "/slow"):
			time.Sleep(10 * time.Millisecond)
		}
		_, _ = w.Write(bytes.Clone(answer))
	}))
}

// serveBackend serves h on a loopback port until the server is closed, and
// returns the server and its address.
func serveBackend(h http.Handler) (*http.Server, string, error) {
	srv := &http.Server{Handler: h}
	ln, err := listen()
	if err != nil {
		return nil, "", err
	}
	go func() { _ = srv.Serve(ln) }()
	return srv, ln.Addr().String(), nil
}
