// Command bench is the load harness: it starts a real Caddy with the batch
// module (in a child process, so that its peak RSS is its own) in front of a
// fast Go backend, all on loopback, and compares batches with separate
// requests. From the repository root:
//
//	go run ./bench             # 5 s per scenario
//	go run ./bench -short      # 1 s per scenario, as CI runs it
//	go run ./bench -soak 3m    # a mixed sync/async soak instead
//	go run ./bench -only c -cpuprofile /tmp/caddy.pprof
//	                           # one scenario, profiling the Caddy process
//
// Scenarios, each with the same client concurrency:
//
//	a  batches of -ops GETs through batch → reverse_proxy → backend
//	b  the same GETs as separate keep-alive requests through reverse_proxy
//	c  batches of -ops GETs through batch → respond (the module's own cost)
//	c1 the same GETs as separate keep-alive requests to respond
//	d  one batch of 100 operations to a backend taking 10 ms each, in
//	   parallel at concurrency 10 and 100, against the ideal (10 × 10 ms, 10 ms)
package main

import (
	"bufio"
	"bytes"
	"context"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	_ "github.com/caddyserver/caddy/v2/modules/standard"
	"github.com/tidwall/gjson"

	_ "github.com/caddy-batch/batch"
)

func main() {
	serve := flag.String("serve", "", "run Caddy with this Caddyfile (used by the harness itself)")
	duration := flag.Duration("duration", 5*time.Second, "how long each scenario runs")
	concurrency := flag.Int("concurrency", 8, "client goroutines")
	ops := flag.Int("ops", 100, "operations per batch")
	short := flag.Bool("short", false, "1 s per scenario")
	soakFor := flag.Duration("soak", 0, "instead of the scenarios, hold a mixed sync/async load this long")
	flag.StringVar(&cpuProfile, "cpuprofile", "", "write a CPU profile of the Caddy process to this file")
	only := flag.String("only", "", "run only these scenarios, comma-separated (a,b,c,c1,d)")
	flag.Parse()
	if *serve != "" {
		runCaddy(*serve)
		return
	}
	if *soakFor > 0 {
		if err := soak(*soakFor, *concurrency); err != nil {
			log.Fatal(err)
		}
		return
	}
	if *short {
		*duration = time.Second
	}
	if *only != "" {
		onlySet = map[string]bool{}
		for _, name := range strings.Split(*only, ",") {
			onlySet[strings.TrimSpace(name)] = true
		}
	}
	if err := run(*duration, *concurrency, *ops); err != nil {
		log.Fatal(err)
	}
}

// onlySet holds the scenarios to run; nil runs all.
var onlySet map[string]bool

func selected(name string) bool { return onlySet == nil || onlySet[name] }

// cpuProfile is where the Caddy process writes its CPU profile, if set.
var cpuProfile string

// runCaddy serves a Caddyfile until the parent closes our stdin.
func runCaddy(cfg string) {
	cfgJSON, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(cfg), nil)
	if err == nil {
		err = caddy.Load(cfgJSON, true)
	}
	if err != nil {
		log.Fatal(err)
	}
	if cpuProfile != "" {
		f, err := os.Create(cpuProfile)
		if err != nil {
			log.Fatal(err)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			log.Fatal(err)
		}
		defer func() { pprof.StopCPUProfile(); f.Close() }()
	}
	_, _ = io.Copy(io.Discard, os.Stdin)
	_ = caddy.Stop()
}

var answer = []byte(`{"id":42,"name":"Alice Example","email":"alice@example.com","balance":1234,"tags":["a","b"]}`)

func listen() (net.Listener, error) { return net.Listen("tcp", "127.0.0.1:0") }

func freePort() (int, error) {
	ln, err := listen()
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

func run(duration time.Duration, concurrency, nops int) error {
	// The backend: fast JSON, and /slow taking 10 ms.
	backend, baddr, err := startBackend()
	if err != nil {
		return err
	}
	defer backend.Close()

	port, err := freePort()
	if err != nil {
		return err
	}
	cfg := fmt.Sprintf(`{
	admin off
	auto_https off
	persist_config off
	log {
		level ERROR
	}
}
http://127.0.0.1:%d {
	batch /batch {
		max_ops 1000
	}
	batch /batch10 {
		mode parallel
		concurrency 10
	}
	batch /batch100 {
		mode parallel
		concurrency 100
	}
	respond /respond/* `+"`%s`"+` 200
	reverse_proxy %s {
		transport http {
			keepalive_idle_conns_per_host 256
		}
	}
}`, port, answer, baddr)
	child, base, client, stop, err := launch(cfg, port, concurrency, "/respond/0")
	if err != nil {
		return err
	}
	defer stop()
	rss := func() string { return vmHWM(child.Process.Pid) }
	fmt.Printf("caddy-batch load harness: %d client goroutines, %d operations per batch, %s per scenario\n", concurrency, nops, duration)
	fmt.Printf("caddy RSS at start: %s\n\n", rss())

	batchOf := func(prefix string, n int) []byte {
		var sb strings.Builder
		sb.WriteByte('[')
		for i := range n {
			if i > 0 {
				sb.WriteByte(',')
			}
			fmt.Fprintf(&sb, `{"path":"%s/%d"}`, prefix, i)
		}
		sb.WriteByte(']')
		return []byte(sb.String())
	}
	proxied, responded := batchOf("/users", nops), batchOf("/respond", nops)

	verdict := func(ok bool) string {
		if ok {
			return "PASS"
		}
		return "MISS"
	}
	scenarios := []struct {
		name, title string
		ops         int
		do          func() error
	}{
		{"a", fmt.Sprintf("batches of %d: batch → reverse_proxy", nops), nops, func() error { return postBatch(client, base+"/batch", proxied, nops) }},
		{"b", "separate requests → reverse_proxy", 1, func() error { return getOne(client, base+"/users/1") }},
		{"c", fmt.Sprintf("batches of %d: batch → respond", nops), nops, func() error { return postBatch(client, base+"/batch", responded, nops) }},
		{"c1", "separate requests → respond", 1, func() error { return getOne(client, base+"/respond/1") }},
	}
	measured := map[string]stats{}
	fmt.Printf("%-52s %12s %10s %10s\n", "scenario", "ops/s", "p50", "p99")
	for _, sc := range scenarios {
		if !selected(sc.name) {
			continue
		}
		s, err := load(duration, concurrency, sc.ops, sc.do)
		if err != nil {
			return fmt.Errorf("%s: %w", sc.name, err)
		}
		measured[sc.name] = s
		fmt.Printf("%-52s %12.0f %10s %10s\n", fmt.Sprintf("%-2s %s", sc.name, sc.title), s.opsPerSec, s.p50.Round(time.Microsecond), s.p99.Round(time.Microsecond))
	}
	fmt.Println()
	for _, r := range []struct {
		x, y   string
		target float64
	}{{"a", "b", 1.5}, {"c", "c1", 10}} {
		x, okx := measured[r.x]
		y, oky := measured[r.y]
		if okx && oky {
			ratio := x.opsPerSec / y.opsPerSec
			fmt.Printf("%-4s = %5.2f  (target ≥ %g)  %s\n", r.x+"/"+r.y, ratio, r.target, verdict(ratio >= r.target))
		}
	}

	// d: latency of one batch of 100 slow operations against the ideal.
	slow := batchOf("/slow", 100)
	for _, d := range []struct {
		path  string
		ideal time.Duration
	}{{"/batch10", 100 * time.Millisecond}, {"/batch100", 10 * time.Millisecond}} {
		if !selected("d") {
			break
		}
		var lat []time.Duration
		for range 5 {
			start := time.Now()
			if err := postBatch(client, base+d.path, slow, 100); err != nil {
				return fmt.Errorf("d: %w", err)
			}
			lat = append(lat, time.Since(start))
		}
		slices.Sort(lat)
		med := lat[len(lat)/2]
		ratio := float64(med) / float64(d.ideal)
		fmt.Printf("d  100 × 10 ms at %-17s median %8s, ideal %6s: %4.2f× (target ≤ 1.3) %s\n",
			strings.TrimPrefix(d.path, "/batch")+" in parallel", med.Round(time.Microsecond), d.ideal, ratio, verdict(ratio <= 1.3))
	}
	fmt.Printf("\ncaddy peak RSS: %s\n", rss())
	return nil
}

// stats of one scenario: operations per second and request latency.
type stats struct {
	opsPerSec float64
	p50, p99  time.Duration
}

// load runs do from concurrency goroutines for duration; each call counts
// as opsPerCall operations.
func load(duration time.Duration, concurrency, opsPerCall int, do func() error) (stats, error) {
	ctx, cancel := context.WithTimeout(context.Background(), duration)
	defer cancel()
	var mu sync.Mutex
	var lat []time.Duration
	var calls atomic.Int64
	var firstErr error
	var wg sync.WaitGroup
	start := time.Now()
	for range concurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var mine []time.Duration
			for ctx.Err() == nil {
				t := time.Now()
				if err := do(); err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = err
					}
					mu.Unlock()
					cancel()
					return
				}
				mine = append(mine, time.Since(t))
				calls.Add(1)
			}
			mu.Lock()
			lat = append(lat, mine...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	elapsed := time.Since(start)
	if firstErr != nil {
		return stats{}, firstErr
	}
	slices.Sort(lat)
	pct := func(p float64) time.Duration {
		if len(lat) == 0 {
			return 0
		}
		return lat[min(len(lat)-1, int(float64(len(lat))*p))]
	}
	return stats{
		opsPerSec: float64(calls.Load()*int64(opsPerCall)) / elapsed.Seconds(),
		p50:       pct(0.50),
		p99:       pct(0.99),
	}, nil
}

// postBatch sends a batch and checks that every operation answered 200.
func postBatch(client *http.Client, url string, body []byte, n int) error {
	resp, err := client.Post(url, "application/json", bytes.NewReader(body))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	out, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("batch answered %d: %.200s", resp.StatusCode, out)
	}
	statuses := gjson.GetBytes(out, "#.status").Array()
	if len(statuses) != n {
		return fmt.Errorf("batch of %d answered %d results", n, len(statuses))
	}
	for i, s := range statuses {
		if s.Int() != http.StatusOK {
			return fmt.Errorf("operation %d answered %d: %.300s", i, s.Int(), out)
		}
	}
	return nil
}

func getOne(client *http.Client, url string) error {
	resp, err := client.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if _, err := io.Copy(io.Discard, resp.Body); err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s answered %d", url, resp.StatusCode)
	}
	return nil
}

// vmHWM reads a process's peak resident set size.
func vmHWM(pid int) string {
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		return "unknown"
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmHWM:"); ok {
			return strings.TrimSpace(v)
		}
	}
	return "unknown"
}
