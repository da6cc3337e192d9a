// Command bench is the load harness: it starts a real Caddy with the batch
// module (in a child process, so that its peak RSS is its own) in front of a
// fast Go backend, all on loopback, and compares batches with separate
// requests. From the repository root:
//
//	go run ./bench             # 5 s per scenario
//	go run ./bench -short      # 1 s per scenario, as CI runs it
//	go run ./bench -soak 3m    # a mixed sync/async soak instead
//	go run ./bench -job 1000000  # one NDJSON job of a million operations, RSS sampled
//	go run ./bench -job 100000 -csv  # the same as a CSV import of PATCH /users/{{item.id}}
//	go run ./bench -kill       # an instance killed (then stopped) mid-job, resumed by another
//	go run ./bench -network    # 10,000 creations behind a 50 ms RTT: separate, batched (h1, h2c), one async job
//	go run ./bench -network -rtt 20ms -users 1000
//	go run ./bench -budget     # 16 sync batches at once: max_inflight 32 holds, against an unbound baseline
//	go run ./bench -pacing -n 5000 -rate 200 [-informational]
//	                           # async jobs against a backend allowing 200 requests/s (429 +
//	                           # Retry-After; RateLimit headers), and sync batches without pacing
//	go run ./bench -storage [-n 20000] [-rounds 3] [-informational]
//	                           # one job on the file system storage, then on it 2 ms and 20 ms
//	                           # away (batch_lag); wall time, storage calls per 1,000 ops
//	go run ./bench -storage -sizes 10000,100000 [-lag 2ms]
//	                           # a job's storage calls per 1,000 ops at each size: flat in N?
//	go run ./bench -cluster [-n 3000] [-rate 200] [-only pacing,queue,adopt] [-informational]
//	                           # three instances sharing one storage: a job each against one
//	                           # rate-limited API; a job queued on a busy instance; what active
//	                           # jobs cost the instances that do not run them
//	go run ./bench -cluster -only pacing,queue -n 600
//	                           # the short form, for CI
//	go run ./bench -keys [-rounds 3] [-informational]
//	                           # 1,000 operations over 50 keys at concurrency 20, a sync batch
//	                           # and a streamed job, with keys against the same without
//	go run ./bench -only c -cpuprofile /tmp/caddy.pprof
//	                           # one scenario, profiling the Caddy process
//
// Scenarios, each with the same client concurrency, taking turns of 500 ms:
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
	"os/signal"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
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
	flag.StringVar(&cpuProfile, "cpuprofile", "", "write a CPU profile of the Caddy process to this file, and the harness's to it.harness")
	only := flag.String("only", "", "run only these scenarios, comma-separated (a,b,c,c1,d; with -cluster: pacing,queue,adopt)")
	jobOps := flag.Int("job", 0, "instead of the scenarios, run one NDJSON job of this many operations, sampling Caddy's RSS")
	maxGrowth := flag.Int64("max-growth", 64, "with -job: fail when Caddy's RSS grows more MiB than this over idle")
	csvJob := flag.Bool("csv", false, "with -job: a CSV job of PATCH /users/{{item.id}}, one row per operation, instead of NDJSON GETs")
	kill := flag.Bool("kill", false, "instead of the scenarios, kill (then stop) an instance mid-job and time its resumption on another")
	networkRun := flag.Bool("network", false, "instead of the scenarios, time creations behind a latency proxy: separate, batched, one async job")
	rtt := flag.Duration("rtt", 50*time.Millisecond, "with -network: the round-trip time the proxy adds")
	users := flag.Int("users", 10000, "with -network: how many users each scenario creates")
	budgetRun := flag.Bool("budget", false, "instead of the scenarios, check max_inflight against a backend counting what it holds at once")
	pacingRun := flag.Bool("pacing", false, "instead of the scenarios, run async jobs against a rate-limited backend (with -n, -rate)")
	nOps := flag.Int("n", 0, "operations per job: with -pacing (default 5000), -storage (20000), -cluster (3000 per instance)")
	paceRate := flag.Int("rate", 200, "with -pacing and -cluster: requests a second the backend allows")
	informational := flag.Bool("informational", false, "with -pacing, -storage, -cluster and -keys: print the targets missed, but exit 0")
	storageRun := flag.Bool("storage", false, "instead of the scenarios, time a job on the file system storage and on storage 2 ms and 20 ms away (with -n, -rounds)")
	rounds := flag.Int("rounds", 3, "with -storage and -keys: how many times each runs, taking turns")
	sizes := flag.String("sizes", "", "with -storage: instead, a job's storage calls per 1,000 operations at these sizes, comma-separated (e.g. 10000,100000)")
	lag := flag.Duration("lag", 2*time.Millisecond, "with -storage -sizes: the storage's latency")
	keysRun := flag.Bool("keys", false, "instead of the scenarios, time operations ordered by key against the same without keys (with -rounds)")
	clusterRun := flag.Bool("cluster", false, "instead of the scenarios, run three instances sharing one storage: pacing, queue, adopt (with -n, -rate, -only)")
	flag.Parse()
	if *serve != "" {
		runCaddy(*serve)
		return
	}
	if *only != "" {
		onlySet = map[string]bool{}
		for _, name := range strings.Split(*only, ",") {
			onlySet[strings.TrimSpace(name)] = true
		}
	}
	orDefault := func(n, def int) int {
		if n == 0 {
			return def
		}
		return n
	}
	if *keysRun {
		if err := keyOrder(*rounds, *informational); err != nil {
			log.Fatal(err)
		}
		return
	}
	if *clusterRun {
		if err := cluster(orDefault(*nOps, 3000), *paceRate, *informational); err != nil {
			log.Fatal(err)
		}
		return
	}
	if *storageRun {
		var err error
		if *sizes != "" {
			var ns []int
			for _, f := range strings.Split(*sizes, ",") {
				n, perr := strconv.Atoi(strings.TrimSpace(f))
				if perr != nil || n < 1 {
					log.Fatalf("-sizes: %q is not a number of operations", f)
				}
				ns = append(ns, n)
			}
			err = storageFlat(ns, *lag, *informational)
		} else {
			err = storageLag(orDefault(*nOps, 20000), *rounds, *informational)
		}
		if err != nil {
			log.Fatal(err)
		}
		return
	}
	if *budgetRun {
		if err := budget(); err != nil {
			log.Fatal(err)
		}
		return
	}
	if *pacingRun {
		if err := pacing(orDefault(*nOps, 5000), *paceRate, *informational); err != nil {
			log.Fatal(err)
		}
		return
	}
	if *jobOps > 0 {
		if err := bigJob(*jobOps, *maxGrowth<<20, *csvJob); err != nil {
			log.Fatal(err)
		}
		return
	}
	if *networkRun {
		if err := network(*users, *rtt); err != nil {
			log.Fatal(err)
		}
		return
	}
	if *kill {
		for _, sig := range []syscall.Signal{syscall.SIGKILL, syscall.SIGTERM} {
			if err := killJob(sig, 2*time.Second); err != nil {
				log.Fatal(err)
			}
		}
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
	// Stopped gracefully when the parent closes stdin, or on SIGTERM.
	stop := make(chan struct{}, 2)
	go func() { _, _ = io.Copy(io.Discard, os.Stdin); stop <- struct{}{} }()
	term := make(chan os.Signal, 1)
	signal.Notify(term, syscall.SIGTERM)
	go func() { <-term; stop <- struct{}{} }()
	<-stop
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
	if cpuProfile != "" { // the harness's own: clients and backend
		f, err := os.Create(cpuProfile + ".harness")
		if err != nil {
			return err
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer func() { pprof.StopCPUProfile(); f.Close() }()
	}
	// The backend: fast JSON, and /slow taking 10 ms.
	backend, baddr, err := startBackend()
	if err != nil {
		return err
	}
	defer backend.Close()

	r, cleanup, err := startRig("", "", fmt.Sprintf(`
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
		max_inflight 100 # its parallelism is measured here, the budget by -budget
	}
	respond /respond/* `+"`%s`"+` 200
	reverse_proxy %s {
		transport http {
			keepalive_idle_conns_per_host 256
		}
	}
`, answer, baddr), concurrency, "/respond/0")
	if err != nil {
		return err
	}
	defer cleanup()
	base, client := r.base, r.client
	rss := func() string { return vmHWM(r.child.Process.Pid) }
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

	scenarios := []struct {
		name, title string
		ops         int
		do          func(*bytes.Buffer) error
	}{
		{"a", fmt.Sprintf("batches of %d: batch → reverse_proxy", nops), nops, func(buf *bytes.Buffer) error { return postBatch(client, base+"/batch", proxied, nops, buf) }},
		{"b", "separate requests → reverse_proxy", 1, func(*bytes.Buffer) error { return getOne(client, base+"/users/1") }},
		{"c", fmt.Sprintf("batches of %d: batch → respond", nops), nops, func(buf *bytes.Buffer) error { return postBatch(client, base+"/batch", responded, nops, buf) }},
		{"c1", "separate requests → respond", 1, func(*bytes.Buffer) error { return getOne(client, base+"/respond/1") }},
	}
	// Scenarios take turns of a slice each, so that a machine whose speed
	// drifts (a shared VM) treats them alike and their ratios hold.
	const slice = 500 * time.Millisecond
	samples := map[string]*sample{}
	for turn := time.Duration(0); turn < duration; turn += slice {
		for _, sc := range scenarios {
			if !selected(sc.name) {
				continue
			}
			if samples[sc.name] == nil {
				samples[sc.name] = &sample{}
			}
			if err := load(samples[sc.name], min(slice, duration-turn), concurrency, sc.ops, sc.do); err != nil {
				return fmt.Errorf("%s: %w", sc.name, err)
			}
		}
	}
	measured := map[string]stats{}
	fmt.Printf("%-52s %12s %10s %10s\n", "scenario", "ops/s", "p50", "p99")
	for _, sc := range scenarios {
		if samples[sc.name] == nil {
			continue
		}
		s := samples[sc.name].stats()
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
			if err := postBatch(client, base+d.path, slow, 100, new(bytes.Buffer)); err != nil {
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
	if selected("d") {
		// What the machine makes of the same 100 requests without batch:
		// sent at once, each on its own kept-alive connection.
		wide := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 128}, Timeout: 60 * time.Second}
		var lat []time.Duration
		for range 6 {
			start := time.Now()
			var wg sync.WaitGroup
			errs := make(chan error, 100)
			for i := range 100 {
				wg.Go(func() {
					if err := getOne(wide, fmt.Sprintf("%s/slow/%d", base, i)); err != nil {
						errs <- err
					}
				})
			}
			wg.Wait()
			close(errs)
			if err := <-errs; err != nil {
				return fmt.Errorf("d: %w", err)
			}
			lat = append(lat, time.Since(start))
		}
		slices.Sort(lat[1:]) // the first opened the connections
		fmt.Printf("   without batch: the 100 as separate requests at once through reverse_proxy, median %8s\n", lat[1+len(lat[1:])/2].Round(time.Microsecond))
	}
	fmt.Printf("\ncaddy peak RSS: %s\n", rss())
	return nil
}

// stats of one scenario: operations per second and request latency.
type stats struct {
	opsPerSec float64
	p50, p99  time.Duration
}

// sample accumulates the turns of one scenario.
type sample struct {
	ops     int64
	elapsed time.Duration
	lat     []time.Duration // per call
}

func (s *sample) stats() stats {
	slices.Sort(s.lat)
	pct := func(p float64) time.Duration {
		if len(s.lat) == 0 {
			return 0
		}
		return s.lat[min(len(s.lat)-1, int(float64(len(s.lat))*p))]
	}
	return stats{
		opsPerSec: float64(s.ops) / s.elapsed.Seconds(),
		p50:       pct(0.50),
		p99:       pct(0.99),
	}
}

// load runs do from concurrency goroutines for duration, each with its own
// buffer, and adds to s; each call counts as opsPerCall operations.
func load(s *sample, duration time.Duration, concurrency, opsPerCall int, do func(*bytes.Buffer) error) error {
	ctx, cancel := context.WithTimeout(context.Background(), duration)
	defer cancel()
	var mu sync.Mutex
	var calls atomic.Int64
	var firstErr error
	var wg sync.WaitGroup
	start := time.Now()
	for range concurrency {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var mine []time.Duration
			var buf bytes.Buffer
			for ctx.Err() == nil {
				t := time.Now()
				if err := do(&buf); err != nil {
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
			s.lat = append(s.lat, mine...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	s.elapsed += time.Since(start)
	s.ops += calls.Load() * int64(opsPerCall)
	return firstErr
}

// postBatch sends a batch and checks that every operation answered 200,
// reading the answer into buf.
func postBatch(client *http.Client, url string, body []byte, n int, buf *bytes.Buffer) error {
	resp, err := client.Post(url, "application/json", bytes.NewReader(body))
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	buf.Reset()
	if _, err := buf.ReadFrom(resp.Body); err != nil {
		return err
	}
	out := buf.Bytes()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("batch answered %d: %.200s", resp.StatusCode, out)
	}
	results := 0
	var bad error
	gjson.ParseBytes(out).ForEach(func(_, res gjson.Result) bool {
		if s := res.Get("status").Int(); s != http.StatusOK {
			bad = fmt.Errorf("operation %d answered %d: %.300s", results, s, res.Raw)
			return false
		}
		results++
		return true
	})
	if bad != nil {
		return bad
	}
	if results != n {
		return fmt.Errorf("batch of %d answered %d results", n, results)
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
