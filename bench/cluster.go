package main

import (
	"bufio"
	"errors"
	"fmt"
	"net/http"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddy-batch/batch/internal/lagstore"
	"github.com/tidwall/gjson"
)

// cluster runs the scenarios of a cluster sharing one storage, those of
// onlySet (pacing, queue, adopt; all when it is nil):
// `go run ./bench -cluster [-n 3000] [-rate 200] [-only pacing,queue,adopt]`.
// It fails on a target missed, unless informational; adopt has none.
func cluster(n, rate int, informational bool) error {
	if n < 1 || rate < 1 {
		return errors.New("-n and -rate must be at least 1")
	}
	var missed []string
	if selected("pacing") {
		m, err := clusterPacing(n, rate)
		if err != nil {
			return fmt.Errorf("pacing: %w", err)
		}
		missed = append(missed, m...)
	}
	if selected("queue") {
		m, err := clusterQueue()
		if err != nil {
			return fmt.Errorf("queue: %w", err)
		}
		missed = append(missed, m...)
	}
	if selected("adopt") {
		if err := clusterAdopt(); err != nil {
			return fmt.Errorf("adopt: %w", err)
		}
	}
	if len(missed) > 0 && !informational {
		return fmt.Errorf("missed: %s", strings.Join(missed, "; "))
	}
	return nil
}

// clusterKey is the credentials_key of every instance, so that any of
// them can run any job: what a job's operations inherit (Authorization)
// is stored encrypted with it.
const clusterKey = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="

// clusterSite is the site of a cluster instance: a job handler (parallel,
// concurrency 16, 4 workers, credentials_key clusterKey) with the handler
// options handler and the async options async (each a line, or empty),
// its process's storage calls at callsPath, and the backend.
func clusterSite(backend, handler, async string) string {
	return fmt.Sprintf(`
	batch_storage_calls %s
	batch /batch /batch/* {
		mode parallel
		concurrency 16
		%s
		async {
			workers 4
			retention 1h
			credentials_key %s
			%s
		}
	}
	reverse_proxy %s
`, callsPath, handler, clusterKey, async, backend)
}

// startCluster launches k instances of site sharing one new storage
// directory, batch_lag at latency 0 over it (its calls counted). The
// cleanup stops them, then removes the directory.
func startCluster(k int, site string) ([]rig, func(), error) {
	dir, err := os.MkdirTemp("", "batch-cluster")
	if err != nil {
		return nil, nil, err
	}
	var rigs []rig
	var stops []func()
	cleanup := func() {
		var wg sync.WaitGroup
		for _, stop := range stops {
			wg.Go(stop)
		}
		wg.Wait()
		os.RemoveAll(dir)
	}
	for range k {
		r, stop, err := startRigIn(dir, lagged(dir, 0), "", site, 8, callsPath)
		if err != nil {
			cleanup()
			return nil, nil, err
		}
		rigs, stops = append(rigs, r), append(stops, stop)
	}
	return rigs, cleanup, nil
}

// clusterBackend is the API of the cluster scenarios. Under /hold/ it
// holds every request until released (or the request ends); it notes
// when the first request under /b/ arrived; anything else goes to lim,
// the rate-limited backend, or, without one, is answered at once.
type clusterBackend struct {
	lim     *limited
	release chan struct{}
	held    atomic.Int64 // requests under /hold/ held now
	firstB  atomic.Int64 // when the first request under /b/ arrived, in Unix nanoseconds; 0: none yet
}

func newClusterBackend(lim *limited) *clusterBackend {
	return &clusterBackend{lim: lim, release: make(chan struct{})}
}

func (b *clusterBackend) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	switch {
	case strings.HasPrefix(r.URL.Path, "/hold/"):
		b.held.Add(1)
		select {
		case <-b.release:
		case <-r.Context().Done():
		}
		b.held.Add(-1)
	case strings.HasPrefix(r.URL.Path, "/b/"):
		b.firstB.CompareAndSwap(0, time.Now().UnixNano())
	case b.lim != nil:
		b.lim.ServeHTTP(w, r)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write(answer)
}

// submitJob submits ops (a JSON array) to base as an async job of auth,
// and returns its id.
func submitJob(client *http.Client, base, auth, ops string) (string, error) {
	out, status, _, err := send(client, http.MethodPost, base+"/batch", ops, auth, "respond-async")
	if err != nil || status != http.StatusAccepted {
		return "", fmt.Errorf("submit: %d %v %.200s", status, err, out)
	}
	return gjson.Get(out, "id").String(), nil
}

// opsOf is a JSON array of n operations, op(i) each.
func opsOf(n int, op func(i int) string) string {
	var sb strings.Builder
	sb.WriteByte('[')
	for i := range n {
		if i > 0 {
			sb.WriteByte(',')
		}
		sb.WriteString(op(i))
	}
	sb.WriteByte(']')
	return sb.String()
}

// progressSample is a job's progress at a time.
type progressSample struct {
	at        time.Time
	completed int64
}

// stallWindow is the span over which a job's rate is taken at each sample.
const stallWindow = time.Second

// longestUnder is the longest span over which a job's rate of completed
// operations stayed under rate. Each sample's rate is taken over the
// stallWindow before it and stands for the middle of that window; a run
// of samples under rate spans from the first's middle to the last's, or
// from the submission (samples[0]) when it starts with the job, and to the
// last sample when it ends with it. A stall of d reads as d to within a
// sample interval or two. at is when the longest began, after the
// submission.
func longestUnder(samples []progressSample, rate float64) (longest, at time.Duration) {
	var runStart time.Time // of the current run under; zero: none
	from := 0              // the current window's first sample
	for j := 1; j < len(samples); j++ {
		s := samples[j]
		if s.at.Sub(samples[0].at) < stallWindow {
			continue
		}
		for from+1 < j && s.at.Sub(samples[from+1].at) >= stallWindow {
			from++
		}
		w := samples[from]
		if float64(s.completed-w.completed)/s.at.Sub(w.at).Seconds() >= rate {
			runStart = time.Time{}
			continue
		}
		mid := w.at.Add(s.at.Sub(w.at) / 2)
		if runStart.IsZero() {
			runStart = mid
			if from == 0 {
				runStart = w.at
			}
		}
		if j == len(samples)-1 {
			mid = s.at
		}
		if d := mid.Sub(runStart); d > longest {
			longest, at = d, runStart.Sub(samples[0].at)
		}
	}
	return longest, at
}

// resultCounts counts a job's results by status, read as NDJSON.
func resultCounts(client *http.Client, base, id, auth string) (map[int64]int, int, error) {
	req, err := http.NewRequest(http.MethodGet, base+"/batch/"+id+"/results", nil)
	if err != nil {
		return nil, 0, err
	}
	req.Header.Set("Authorization", auth)
	req.Header.Set("Accept", "application/x-ndjson")
	resp, err := client.Do(req)
	if err != nil {
		return nil, 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, 0, fmt.Errorf("results of %s: %d", id, resp.StatusCode)
	}
	counts, total := map[int64]int{}, 0
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := gjson.ParseBytes(sc.Bytes())
		if line.Get("summary").Bool() {
			continue
		}
		counts[line.Get("status").Int()]++
		total++
	}
	return counts, total, sc.Err()
}

// clusterPacing runs, for each way the API tells its limit (429 +
// Retry-After; RateLimit headers), three instances sharing one storage,
// one job of n POSTs submitted to each at once by three owners, against
// one backend allowing rate requests a second, and prints the cluster's
// wall time against N/R, the backend's 429s, the results 429 or 504, and
// each instance's longest stall. Jobs still going after 3 × N/R + 30 s
// are canceled, and counted as they stand. It returns the targets missed.
func clusterPacing(n, rate int) ([]string, error) {
	const k = 3
	total := k * n
	ideal := time.Duration(float64(total) / float64(rate) * float64(time.Second))
	// A fair third of the slowest cluster rate the wall-time target
	// allows: a fair third of R itself would put a fair instance of a
	// cluster running at 0.9 R under it all along.
	stall := float64(rate) / k / 1.15
	// Far past the target; today's engine can take longer still.
	limit := 3*ideal + 30*time.Second
	fmt.Printf("cluster pacing: %d instances sharing one storage (async, workers 4, default lease), one job of %d POSTs each\n"+
		"(parallel, concurrency 16), submitted at once by one owner, to one backend allowing %d requests/s\n"+
		"(token bucket, burst %d); N = %d, N/R = %s. Progress sampled every 250 ms; an instance stalls while its\n"+
		"rate over the last %s is under %.0f/s (a third of R/1.15)\n\n",
		k, n, rate, paceBurst, total, ideal.Round(time.Millisecond), stallWindow, stall)
	var missed []string
	for _, headers := range []bool{false, true} {
		title := "429 + Retry-After"
		if headers {
			title = "RateLimit headers"
		}
		m, err := clusterPacingRun(k, n, rate, headers, stall, limit)
		if err != nil {
			return nil, fmt.Errorf("%s: %w", title, err)
		}
		share := 0.0
		if m.answers > 0 {
			share = float64(m.refused) / float64(m.answers)
		}
		ratio := m.wall.Seconds() / ideal.Seconds()
		fmt.Printf("%s: cluster wall %.1f s, %.2f × N/R; backend answers %d, of them 429 %d (%.1f%%); results 429 %d, 504 %d, other non-2xx %d",
			title, m.wall.Seconds(), ratio, m.answers, m.refused, 100*share, m.results429, m.results504, m.other)
		if m.skipped > 0 {
			fmt.Printf(", not run %d", m.skipped)
		}
		fmt.Println()
		fmt.Printf("  %-9s %9s %10s %20s %16s\n", "instance", "ends at", "mean rate", "longest stall (from)", "storage calls/s")
		worst := time.Duration(0)
		for i, in := range m.instances {
			ends := fmt.Sprintf("%.1f s", in.ends.Seconds())
			if in.ends == 0 {
				ends = "–"
			}
			fmt.Printf("  %-9d %9s %8.0f/s %11.1f s (%4.1f s) %16.1f\n", i+1, ends, in.rate, in.stall.Seconds(), in.stallAt.Seconds(), in.callsPerSec)
			worst = max(worst, in.stall)
		}
		targets := []struct {
			name string
			ok   bool
		}{
			{"within 1.15 × N/R", m.ended && ratio <= 1.15},
			{"under 5% of answers 429", share < 0.05},
			{"no result 429 or 504", m.ended && m.results429 == 0 && m.results504 == 0},
			{"no instance stalled over 3 s", m.ended && worst <= 3*time.Second},
		}
		var verdicts []string
		for _, t := range targets {
			verdicts = append(verdicts, t.name+": "+verdict(t.ok))
			if !t.ok {
				missed = append(missed, "pacing, "+title+": "+t.name)
			}
		}
		if m.note != "" {
			verdicts = append(verdicts, m.note)
		}
		fmt.Printf("  %s\n\n", strings.Join(verdicts, "; "))
	}
	return missed, nil
}

// clusterMeasure is what one run of clusterPacing measured.
type clusterMeasure struct {
	wall                          time.Duration // from the submissions to the last job's end
	answers, refused              int64         // by the backend: all, and 429
	results429, results504, other int           // results 429, 504, and other non-2xx but
	skipped                       int           // 424: not run (the job was canceled)
	ended                         bool          // every job completed, with every result
	instances                     []instanceMeasure
	note                          string
}

// instanceMeasure is what one instance of a cluster run did.
type instanceMeasure struct {
	ends        time.Duration // when its job ended, from the submissions; 0: it did not
	rate        float64       // its job's operations a second, to its end or its last sample
	stall       time.Duration // the longest span its job's rate stayed under the stall rate
	stallAt     time.Duration // when that span began, after the submission
	callsPerSec float64       // its storage calls a second over the cluster's wall time
}

// clusterPacingRun runs one job of n POSTs on each of k instances, and
// cancels those still going after limit.
func clusterPacingRun(k, n, rate int, headers bool, stall float64, limit time.Duration) (clusterMeasure, error) {
	total := k * n
	var m clusterMeasure
	lim := &limited{rate: float64(rate), headers: headers}
	backend, addr, err := serveBackend(newClusterBackend(lim))
	if err != nil {
		return m, err
	}
	defer backend.Close()
	rigs, cleanup, err := startCluster(k, clusterSite(addr, "", ""))
	if err != nil {
		return m, err
	}
	defer cleanup()
	body := opsOf(n, func(i int) string {
		return fmt.Sprintf(`{"id":"o%d","method":"POST","path":"/items","body":{"n":%d}}`, i, i)
	})
	// One owner: an import split across the cluster's instances, paced
	// as one caller's (SPEC §15: pacing is learned per caller and API).
	auth := func(int) string { return "Bearer importer" }
	before := make([]lagstore.Counts, k)
	for i, r := range rigs {
		if before[i], err = storageCalls(r.client, r.base); err != nil {
			return m, err
		}
	}

	ids := make([]string, k)
	errs := make([]error, k)
	var wg sync.WaitGroup
	start := time.Now()
	for i, r := range rigs {
		wg.Go(func() { ids[i], errs[i] = submitJob(r.client, r.base, auth(i), body) })
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return m, err
	}
	samples := make([][]progressSample, k)
	for i := range samples {
		samples[i] = []progressSample{{at: start}}
	}
	ended := make([]time.Duration, k)
	last := make([]gjson.Result, k)
	for left := k; left > 0; {
		time.Sleep(250 * time.Millisecond)
		for i, r := range rigs {
			if ended[i] > 0 {
				continue
			}
			out, status, _, err := send(r.client, http.MethodGet, r.base+"/batch/"+ids[i], "", auth(i), "")
			if err != nil || status != http.StatusOK {
				return m, fmt.Errorf("progress: %d %v %.200s", status, err, out)
			}
			p := gjson.Parse(out)
			at := time.Now()
			samples[i] = append(samples[i], progressSample{at, p.Get("completed").Int()})
			last[i] = p
			if s := p.Get("status").String(); s != "queued" && s != "running" {
				ended[i] = at.Sub(start)
				left--
			}
		}
		if left > 0 && time.Since(start) > limit {
			// Bounded: what has not started is skipped, and the rest counted.
			done := int64(0)
			for _, s := range samples {
				done += s[len(s)-1].completed
			}
			m.note = fmt.Sprintf("canceled after %s with %d of %d done", limit.Round(time.Second), done, total)
			for i, r := range rigs {
				if ended[i] == 0 {
					_, _, _, _ = send(r.client, http.MethodDelete, r.base+"/batch/"+ids[i], "", auth(i), "")
				}
			}
			for i, r := range rigs {
				if ended[i] == 0 {
					if _, _, err := awaitJob(r.client, r.base, ids[i], auth(i), 100*time.Millisecond, time.Minute); err != nil {
						return m, err
					}
				}
			}
			break
		}
	}
	m.wall = time.Since(start)
	if m.note == "" {
		m.wall = slices.Max(ended)
	}
	m.answers, m.refused = lim.answers.Load(), lim.refused.Load()
	m.ended = m.note == ""
	for i, r := range rigs {
		after, err := storageCalls(r.client, r.base)
		if err != nil {
			return m, err
		}
		counts, got, err := resultCounts(r.client, r.base, ids[i], auth(i))
		if err != nil {
			return m, err
		}
		for status, c := range counts {
			switch {
			case status == http.StatusTooManyRequests:
				m.results429 += c
			case status == http.StatusGatewayTimeout:
				m.results504 += c
			case status == http.StatusFailedDependency:
				m.skipped += c
			case status < 200 || status > 299:
				m.other += c
			}
		}
		if got != n || last[i].Get("status").String() != "completed" {
			m.ended = false
			if m.note == "" {
				m.note = fmt.Sprintf("instance %d's job ended %s with %d results of %d", i+1, last[i].Get("status").String(), got, n)
			}
		}
		in := instanceMeasure{ends: ended[i], callsPerSec: float64(after.Sub(before[i]).Total()) / m.wall.Seconds()}
		in.stall, in.stallAt = longestUnder(samples[i], stall)
		if s := samples[i][len(samples[i])-1]; s.at.After(start) {
			in.rate = float64(s.completed) / s.at.Sub(start).Seconds()
		}
		m.instances = append(m.instances, in)
	}
	return m, nil
}

// queueLimit is how long the queue scenario waits for the short job.
const queueLimit = 20 * time.Second

// clusterQueue fills the 4 workers of one of three instances with jobs of
// owner A that the backend holds, then submits a short job of owner B to
// that instance, and reports how long B's job waits, the two other
// instances idle. Target: a few seconds (5). It returns the targets
// missed.
func clusterQueue() ([]string, error) {
	const workers = 4
	backend := newClusterBackend(nil)
	srv, addr, err := serveBackend(backend)
	if err != nil {
		return nil, err
	}
	defer srv.Close()
	released := sync.OnceFunc(func() { close(backend.release) })
	rigs, cleanup, err := startCluster(3, clusterSite(addr, "op_timeout 5m", ""))
	if err != nil {
		return nil, err
	}
	defer cleanup()
	defer released() // before the instances stop: they wait for what is in flight
	fmt.Printf("cluster queue: 3 instances sharing one storage (async, workers %d, default lease); owner A fills instance 1's\n"+
		"workers with %d jobs the backend holds, then owner B submits a job of 10 GETs to instance 1; instances 2 and 3 are idle\n", workers, workers)
	r := rigs[0]
	for i := range workers {
		if _, err := submitJob(r.client, r.base, "Bearer owner-a", fmt.Sprintf(`[{"path":"/hold/a%d"}]`, i)); err != nil {
			return nil, err
		}
	}
	for deadline := time.Now().Add(30 * time.Second); backend.held.Load() < workers; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("%d of A's %d jobs reached the backend", backend.held.Load(), workers)
		}
	}
	start := time.Now()
	id, err := submitJob(r.client, r.base, "Bearer owner-b", opsOf(10, func(i int) string { return fmt.Sprintf(`{"path":"/b/%d"}`, i) }))
	if err != nil {
		return nil, err
	}
	// B's status is read through instance 3, from storage: instance 1
	// answers for the job it queued from memory.
	var running time.Duration
	status := "queued"
	for time.Since(start) < queueLimit && backend.firstB.Load() == 0 {
		time.Sleep(100 * time.Millisecond)
		out, code, _, err := send(rigs[2].client, http.MethodGet, rigs[2].base+"/batch/"+id, "", "Bearer owner-b", "")
		if err != nil || code != http.StatusOK {
			return nil, fmt.Errorf("progress: %d %v %.200s", code, err, out)
		}
		if status = gjson.Get(out, "status").String(); status != "queued" && running == 0 {
			running = time.Since(start)
		}
	}
	first := time.Duration(0)
	if at := backend.firstB.Load(); at != 0 {
		first = time.Unix(0, at).Sub(start)
	}
	ok := first > 0 && first <= 5*time.Second
	switch {
	case first > 0:
		fmt.Printf("B's first operation reached the backend %.2f s after its submission", first.Seconds())
	default:
		fmt.Printf("B's first operation had not reached the backend %s after its submission", queueLimit)
	}
	if running > 0 {
		fmt.Printf(" (its status, read through instance 3, left queued after %.2f s)", running.Seconds())
	} else {
		fmt.Printf(" (its status, read through instance 3: %s)", status)
	}
	fmt.Printf("\n  B waits a few seconds at most (5 s): %s\n\n", verdict(ok))
	if !ok {
		return []string{"queue: B waits a few seconds at most"}, nil
	}
	return nil, nil
}

// clusterAdopt measures what active jobs cost the instances that do not
// run them: at the default lease and at lease 3s, two instances sharing
// one storage, instance 1 holding 1, 100, then 1,000 active jobs (4
// running, the rest waiting; each one operation the backend holds),
// instance 2 idle; the storage calls a second of each, from batch_lag's
// counters, and their CPU. The jobs inherit credentials and the instances
// have no credentials_key: they cannot move, so instance 2 stays idle
// (jobs that can move it would take, as the cluster's workers are one
// pool). No target.
func clusterAdopt() error {
	levels := []int{1, 100, 1000}
	fmt.Printf("cluster adoption: 2 instances sharing one storage (async, workers 4); instance 1 holds the active jobs\n" +
		"(4 running, the rest waiting in its memory: each one operation the backend holds, inheriting credentials\n" +
		"with no credentials_key, so that they cannot move), instance 2 is idle. Storage calls a second and CPU\n" +
		"(share of one core) of each, measured over whole periods of the adoption and renewal ticks\n\n")
	fmt.Printf("%-12s %7s %15s %7s %15s %7s\n", "lease", "active", "idle calls/s", "CPU", "busy calls/s", "CPU")
	for _, lease := range []struct {
		title  string
		option string
		window time.Duration // a whole number of adoption (lease/10) and renewal (lease/4) periods
	}{
		{"30s (default)", "", 15 * time.Second},
		{"3s", "lease 3s", 3 * time.Second},
	} {
		if err := adoptRun(lease.title, lease.option, lease.window, levels); err != nil {
			return fmt.Errorf("lease %s: %w", lease.title, err)
		}
	}
	fmt.Println()
	return nil
}

func adoptRun(title, leaseOption string, window time.Duration, levels []int) error {
	backend := newClusterBackend(nil)
	srv, addr, err := serveBackend(backend)
	if err != nil {
		return err
	}
	defer srv.Close()
	defer close(backend.release)
	site := strings.Replace(clusterSite(addr, "op_timeout 10m", leaseOption), "credentials_key "+clusterKey, "", 1)
	rigs, cleanup, err := startCluster(2, site)
	if err != nil {
		return err
	}
	// Killed, not stopped: a graceful stop would hand over, or run, every
	// job held; the storage goes with them.
	defer cleanup()
	defer func() {
		for _, r := range rigs {
			_ = r.child.Process.Kill()
		}
	}()
	busy, idle := rigs[0], rigs[1]
	submitted := 0
	var breakdowns []string
	for _, level := range levels {
		var next atomic.Int64
		next.Store(int64(submitted))
		var failed atomic.Pointer[error]
		var wg sync.WaitGroup
		for range 8 {
			wg.Go(func() {
				for failed.Load() == nil {
					i := next.Add(1) - 1
					if i >= int64(level) {
						return
					}
					if _, err := submitJob(busy.client, busy.base, "Bearer owner-adopt", fmt.Sprintf(`[{"path":"/hold/j%d"}]`, i)); err != nil {
						failed.Store(&err)
					}
				}
			})
		}
		wg.Wait()
		if e := failed.Load(); e != nil {
			return *e
		}
		submitted = level
		want := int64(min(level, 4))
		for deadline := time.Now().Add(30 * time.Second); backend.held.Load() < want; time.Sleep(20 * time.Millisecond) {
			if time.Now().After(deadline) {
				return fmt.Errorf("%d of %d running jobs reached the backend", backend.held.Load(), want)
			}
		}
		time.Sleep(time.Second) // the submissions' own calls done
		type snapshot struct {
			calls lagstore.Counts
			cpu   time.Duration
		}
		take := func() ([2]snapshot, error) {
			var s [2]snapshot
			for i, r := range []rig{idle, busy} {
				c, err := storageCalls(r.client, r.base)
				if err != nil {
					return s, err
				}
				s[i] = snapshot{c, cpuTime(r.child.Process.Pid)}
			}
			return s, nil
		}
		from, err := take()
		if err != nil {
			return err
		}
		start := time.Now()
		time.Sleep(window)
		to, err := take()
		if err != nil {
			return err
		}
		secs := time.Since(start).Seconds()
		var cols []string
		note := ""
		for i := range 2 {
			d := to[i].calls.Sub(from[i].calls)
			if i == 0 && d.Store > 0 {
				// An idle instance stores nothing; one that does took jobs
				// over: the busy one could not renew its heartbeat in time.
				note = "  (not idle: instance 2 took over jobs, instance 1 having not renewed its heartbeat in time)"
			}
			cols = append(cols, fmt.Sprintf("%15.1f %6.1f%%", float64(d.Total())/secs, 100*(to[i].cpu-from[i].cpu).Seconds()/secs))
			if level == levels[len(levels)-1] {
				breakdowns = append(breakdowns, fmt.Sprintf("  lease %s, %d active, %s instance, calls/s by method: %s",
					title, level, []string{"idle", "busy"}[i], breakdown(d, secs)))
			}
		}
		fmt.Printf("%-12s %7d %s %s%s\n", title, level, cols[0], cols[1], note)
	}
	for _, b := range breakdowns {
		fmt.Println(b)
	}
	return nil
}
