package main

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/tidwall/gjson"
)

// bigJob submits one NDJSON job of n small GETs to a fast backend, runs it
// to its end and streams its results back, sampling Caddy's resident
// memory from /proc throughout: `go run ./bench -job 1000000`. It fails
// when the memory grows more than maxGrowth over idle. With csv, the job
// is a CSV import of n rows, each a PATCH /users/{{item.id}}.
func bigJob(n int, maxGrowth int64, csv bool) error {
	backend, addr, err := startBackend()
	if err != nil {
		return err
	}
	defer backend.Close()
	r, cleanup, err := startRig("batch-job", "", fmt.Sprintf(`
	batch /batch /batch/* {
		mode parallel
		concurrency 16
		async {
			retention 1h
		}
	}
	reverse_proxy %s
`, addr), 4, "/batch/00000000000000000000000000000000")
	if err != nil {
		return err
	}
	defer cleanup()
	base, client, pid := r.base, r.client, r.child.Process.Pid
	time.Sleep(time.Second) // settled
	idle := vmRSS(pid)
	var peak atomic.Int64
	peak.Store(idle)
	done := make(chan struct{})
	var sampled sync.WaitGroup
	sampled.Go(func() {
		for {
			select {
			case <-done:
				return
			case <-time.After(50 * time.Millisecond):
				if r := vmRSS(pid); r > peak.Load() {
					peak.Store(r)
				}
			}
		}
	})
	phase := func(name string) func() time.Duration {
		start := time.Now()
		return func() time.Duration {
			d := time.Since(start)
			fmt.Printf("  %-34s %7.1f s  %5.1f s per million  peak RSS %5.1f MiB (+%.1f over idle)\n", name, d.Seconds(),
				d.Seconds()*1e6/float64(n), mib(peak.Load()), mib(peak.Load()-idle))
			return d
		}
	}
	what, submit := "NDJSON operations (GETs", submitNDJSON
	if csv {
		what, submit = "CSV rows (PATCH /users/{{item.id}}", submitCSV
	}
	fmt.Printf("job of %d %s to a fast backend, parallel, concurrency 16); Caddy idle RSS %.1f MiB\n", n, what, mib(idle))

	end := phase("submit (stream, validate, store)")
	id, err := submit(client, base, "Bearer bench", n)
	if err != nil {
		return err
	}
	end()

	end = phase("run")
	last, _, err := awaitJob(client, base, id, "Bearer bench", 500*time.Millisecond, 0)
	if err != nil {
		return err
	}
	end()
	if last.Get("status").String() != "completed" || last.Get("succeeded").Int() != int64(n) {
		return fmt.Errorf("job ended: %s", last.Raw)
	}

	end = phase("results (NDJSON stream)")
	req, _ := http.NewRequest(http.MethodGet, base+"/batch/"+id+"/results", nil)
	req.Header.Set("Authorization", "Bearer bench")
	req.Header.Set("Accept", "application/x-ndjson")
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	lines := 0
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		lines++
	}
	resp.Body.Close()
	end()
	close(done)
	sampled.Wait()
	if lines != n+1 {
		return fmt.Errorf("%d result lines for %d operations and the summary", lines, n)
	}
	growth := peak.Load() - idle
	fmt.Printf("  RSS: idle %.1f MiB, peak %.1f MiB, growth %.1f MiB (limit %.0f MiB); storage %s\n",
		mib(idle), mib(peak.Load()), mib(growth), mib(maxGrowth), du(r.storage))
	if growth > maxGrowth {
		return fmt.Errorf("caddy's RSS grew %.1f MiB over idle running a %d-operation job", mib(growth), n)
	}
	return nil
}

// submitNDJSON submits to base/batch, as auth, one NDJSON job of n GETs
// of /users/<i>, and returns its id.
func submitNDJSON(client *http.Client, base, auth string, n int) (string, error) {
	return submitStreamed(client, base+"/batch", "application/x-ndjson", auth, func(bw *bufio.Writer) {
		for i := range n {
			fmt.Fprintf(bw, `{"path":"/users/%d"}`+"\n", i)
		}
	})
}

// submitCSV submits to base/batch, as auth, one CSV job of n rows, each
// a PATCH /users/{{item.id}} with a body template, and returns its id.
func submitCSV(client *http.Client, base, auth string, n int) (string, error) {
	q := url.Values{"method": {"PATCH"}, "path": {"/users/{{item.id}}"}, "body": {`{"name":"{{item.name}}","email":"{{item.email}}"}`}}
	return submitStreamed(client, base+"/batch?"+q.Encode(), "text/csv", auth, func(bw *bufio.Writer) {
		bw.WriteString("id,name,email\n")
		for i := range n {
			fmt.Fprintf(bw, "%d,User %d,user%d@example.com\n", i, i, i)
		}
	})
}

// submitStreamed submits to url, as auth, an async job whose body write
// generates as it is sent, never held, and returns its id.
func submitStreamed(client *http.Client, url, contentType, auth string, write func(*bufio.Writer)) (string, error) {
	pr, pw := io.Pipe()
	go func() {
		bw := bufio.NewWriterSize(pw, 64<<10)
		write(bw)
		_ = bw.Flush()
		_ = pw.Close()
	}()
	req, _ := http.NewRequest(http.MethodPost, url, pr)
	req.Header.Set("Content-Type", contentType)
	req.Header.Set("Authorization", auth)
	req.Header.Set("Prefer", "respond-async")
	resp, err := client.Do(req)
	if err != nil {
		return "", err
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusAccepted {
		return "", fmt.Errorf("submit: %d %s", resp.StatusCode, body)
	}
	return gjson.GetBytes(body, "id").String(), nil
}

// killJob runs a 2,000-operation job on one of two Caddy instances sharing
// storage, kills it (SIGKILL, or SIGTERM for a graceful stop) mid-job, and
// reports how long the job waited for the other, and what the backend saw
// twice: `go run ./bench -kill`.
func killJob(sig syscall.Signal, lease time.Duration) error {
	var mu sync.Mutex
	seen := map[string][]string{} // idempotency keys by operation
	var times []time.Time
	backend := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasPrefix(r.URL.Path, "/users/") {
			mu.Lock()
			seen[r.URL.Path] = append(seen[r.URL.Path], r.Header.Get("Idempotency-Key"))
			times = append(times, time.Now())
			mu.Unlock()
			time.Sleep(5 * time.Millisecond)
		}
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(answer)
	})}
	ln, err := listen()
	if err != nil {
		return err
	}
	go func() { _ = backend.Serve(ln) }()
	defer backend.Close()
	storage, err := os.MkdirTemp("", "batch-kill")
	if err != nil {
		return err
	}
	defer os.RemoveAll(storage)
	site := fmt.Sprintf(`
	batch /batch /batch/* {
		mode parallel
		async {
			lease %s
			credentials_key MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=
		}
	}
	reverse_proxy %s
`, lease, ln.Addr())
	var bases []string
	var children []*exec.Cmd
	var client *http.Client
	for range 2 {
		port, err := freePort()
		if err != nil {
			return err
		}
		child, base, c, stop, err := launch(caddyfile(fileSystem(storage), port, "", site), port, 4, "/batch/00000000000000000000000000000000")
		if err != nil {
			return err
		}
		defer stop()
		bases, children, client = append(bases, base), append(children, child), c
	}
	const n = 2000
	var sb strings.Builder
	for i := range n {
		if i > 0 {
			sb.WriteByte(',')
		}
		fmt.Fprintf(&sb, `{"id":"u%d","path":"/users/%d"}`, i, i)
	}
	out, status, _, err := send(client, http.MethodPost, bases[1]+"/batch", "["+sb.String()+"]", "Bearer bench", "respond-async")
	if err != nil || status != http.StatusAccepted {
		return fmt.Errorf("submit: %d %v %s", status, err, out)
	}
	id := gjson.Get(out, "id").String()
	for {
		mu.Lock()
		k := len(times)
		mu.Unlock()
		if k >= n/4 {
			break
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err := children[1].Process.Signal(sig); err != nil {
		return err
	}
	stopped := time.Now()
	mu.Lock()
	before := len(times)
	mu.Unlock()
	for {
		time.Sleep(100 * time.Millisecond)
		out, status, _, err := send(client, http.MethodGet, bases[0]+"/batch/"+id, "", "Bearer bench", "")
		if err != nil || status != 200 {
			return fmt.Errorf("progress: %d %v %s", status, err, out)
		}
		if s := gjson.Get(out, "status").String(); s == "completed" {
			break
		} else if s == "error" || s == "canceled" {
			return fmt.Errorf("job ended: %s", out)
		}
		if time.Since(stopped) > time.Minute {
			return errors.New("the job was not resumed")
		}
	}
	mu.Lock()
	defer mu.Unlock()
	var gap time.Duration
	for _, t := range times[before:] {
		if t.After(stopped) {
			gap = t.Sub(stopped)
			break
		}
	}
	twice, badKeys := 0, 0
	for path, keys := range seen {
		if len(keys) > 1 {
			twice++
		}
		for _, k := range keys {
			if k != id+".u"+strings.TrimPrefix(path, "/users/") {
				badKeys++
			}
		}
	}
	name := map[syscall.Signal]string{syscall.SIGKILL: "SIGKILL", syscall.SIGTERM: "SIGTERM"}[sig]
	fmt.Printf("  %-8s at operation %d of %d, lease %s: resumed by the other instance after %v; %d operations sent twice, %d without their key; all %d ran\n",
		name, before, n, lease, gap.Round(time.Millisecond), twice, badKeys, len(seen))
	if len(seen) != n || badKeys > 0 {
		return fmt.Errorf("%d of %d operations ran, %d keys wrong", len(seen), n, badKeys)
	}
	return nil
}

// errJobTimeout is awaitJob's when the job is still going at its limit.
var errJobTimeout = errors.New("the job did not end in time")

// awaitJob polls the progress of job id every interval until the job ends
// (neither queued nor running), and returns its last progress and how many
// polls it made. With a limit (0: none), a job still going after it is
// errJobTimeout, with its progress.
func awaitJob(client *http.Client, base, id, auth string, every, limit time.Duration) (gjson.Result, int, error) {
	start := time.Now()
	for polls := 1; ; polls++ {
		time.Sleep(every)
		out, status, _, err := send(client, http.MethodGet, base+"/batch/"+id, "", auth, "")
		if err != nil || status != http.StatusOK {
			return gjson.Result{}, polls, fmt.Errorf("progress: %d %v %s", status, err, out)
		}
		p := gjson.Parse(out)
		if s := p.Get("status").String(); s != "queued" && s != "running" {
			return p, polls, nil
		}
		if limit > 0 && time.Since(start) >= limit {
			return p, polls, errJobTimeout
		}
	}
}

// vmRSS is a process's resident memory now, in bytes, from /proc.
func vmRSS(pid int) int64 {
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmRSS:"); ok {
			kb, _ := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")), 10, 64)
			return kb << 10
		}
	}
	return 0
}

func mib(b int64) float64 { return float64(b) / (1 << 20) }

// du is the size of what dir holds.
func du(dir string) string {
	out, err := exec.Command("du", "-sh", dir).Output()
	if err != nil {
		return "?"
	}
	return strings.Fields(string(out))[0]
}
