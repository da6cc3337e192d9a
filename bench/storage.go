package main

import (
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/caddy-batch/batch/internal/lagstore"
)

// storageSite is the site of the storage scenarios: a job's handler as
// -job has it, and its process's storage calls at callsPath.
func storageSite(backend string) string {
	return fmt.Sprintf(`
	batch_storage_calls %s
	batch /batch /batch/* {
		mode parallel
		concurrency 16
		async {
			retention 1h
		}
	}
	reverse_proxy %s
`, callsPath, backend)
}

// storageLag measures what a storage a network away costs a job:
// `go run ./bench -storage [-n 20000] [-rounds 3]`. One NDJSON job of n
// GETs to a fast backend, run to its end, on Caddy's file system storage,
// and on batch_lag (the same, every storage call waiting 2 ms, then
// 20 ms). The three Caddys run side by side, each runs a job of at most
// 1,000 operations to warm up, then they take turns, rounds times,
// so that a drift of this shared machine's speed treats them alike; a
// job's wall time runs from the start of its submission to its end as
// seen polling every 50 ms. Each round's job on batch_lag is compared
// with that round's on the file system, and the median ratio is taken.
// Targets (SPEC
// §15): within 1.05 × the file system's wall time at 2 ms, 1.15 × at
// 20 ms. It fails on a miss, unless informational.
func storageLag(n, rounds int, informational bool) error {
	if n < 1 || rounds < 1 {
		return errors.New("-n and -rounds must be at least 1")
	}
	backend, addr, err := startBackend()
	if err != nil {
		return err
	}
	defer backend.Close()
	type config struct {
		title   string
		latency time.Duration // of batch_lag; < 0: the file system storage
		target  float64       // the most wall time, × the file system's
		r       rig
		runs    []jobRun
	}
	configs := []*config{
		{title: "file system", latency: -1},
		{title: "2 ms away (batch_lag 2ms)", latency: 2 * time.Millisecond, target: 1.05},
		{title: "20 ms away (batch_lag 20ms)", latency: 20 * time.Millisecond, target: 1.15},
	}
	for _, c := range configs {
		dir, err := os.MkdirTemp("", "batch-storage")
		if err != nil {
			return err
		}
		defer os.RemoveAll(dir)
		storage := fileSystem(dir)
		if c.latency >= 0 {
			storage = lagged(dir, c.latency)
		}
		r, stop, err := startRigIn(dir, storage, "", storageSite(addr), 4, callsPath)
		if err != nil {
			return err
		}
		defer stop()
		c.r = r
	}
	fmt.Printf("storage: one NDJSON job of %d GETs (parallel, concurrency 16) to a fast backend, from its submission\n"+
		"to its end, on each storage in turn, %d round(s); wall, submit and calls of the median run; × file system: the median of\n"+
		"each round's ratio to the file system's run of that round\n\n", n, rounds)
	// A first job each, not measured: connections opened, code paths warm.
	for _, c := range configs {
		if _, err := timedJob(c.r, min(n, 1000), false); err != nil {
			return fmt.Errorf("%s: warming up: %w", c.title, err)
		}
	}
	// Each round starts at the next storage, so that none is always run
	// first; each storage is compared with the file system's run of the
	// same round, a few seconds apart, the shared machine's drift being
	// slower than that.
	for round := range rounds {
		for k := range configs {
			c := configs[(round+k)%len(configs)]
			run, err := timedJob(c.r, n, c.latency >= 0)
			if err != nil {
				return fmt.Errorf("%s: %w", c.title, err)
			}
			c.runs = append(c.runs, run)
		}
	}
	fmt.Printf("%-28s %9s %13s %8s %14s %20s\n", "storage", "job wall", "range", "submit", "× file system", "calls per 1,000 ops")
	var missed []string
	for _, c := range configs {
		m := medianRun(c.runs)
		lo, hi := slices.MinFunc(c.runs, byWall), slices.MaxFunc(c.runs, byWall)
		ratios := make([]float64, len(c.runs))
		for i, run := range c.runs {
			ratios[i] = run.wall.Seconds() / configs[0].runs[i].wall.Seconds()
		}
		slices.Sort(ratios)
		ratio := ratios[len(ratios)/2]
		vs := fmt.Sprintf("%.2f", ratio)
		if c.target > 0 {
			ok := ratio <= c.target
			vs += fmt.Sprintf(" %s", verdict(ok))
			if !ok {
				missed = append(missed, fmt.Sprintf("%s: %.2f × the file system (target ≤ %.2f)", c.title, ratio, c.target))
			}
		}
		calls := "–"
		if c.latency >= 0 {
			calls = fmt.Sprintf("%.1f", m.perThousand(n))
		}
		fmt.Printf("%-28s %7.2f s %13s %6.2f s %14s %20s\n", c.title, m.wall.Seconds(),
			fmt.Sprintf("%.2f–%.2f", lo.wall.Seconds(), hi.wall.Seconds()), m.submit.Seconds(), vs, calls)
	}
	fmt.Printf("\ntargets (SPEC §15): ≤ 1.05 × at 2 ms, ≤ 1.15 × at 20 ms\n")
	for _, c := range configs[1:] {
		fmt.Printf("calls per 1,000 ops at %s, by method: %s\n", c.title, breakdown(medianRun(c.runs).calls, float64(n)/1000))
	}
	if len(missed) > 0 && !informational {
		return fmt.Errorf("missed: %s", strings.Join(missed, "; "))
	}
	return nil
}

// storageFlat prints a job's storage calls per 1,000 operations at each
// of sizes, on batch_lag at latency: `go run ./bench -storage -sizes
// 10000,100000`. Flat in N (SPEC §15) is taken as the most per 1,000 ops
// within 1.1 × the fewest; it fails otherwise, unless informational.
func storageFlat(sizes []int, latency time.Duration, informational bool) error {
	backend, addr, err := startBackend()
	if err != nil {
		return err
	}
	defer backend.Close()
	dir, err := os.MkdirTemp("", "batch-storage")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	r, stop, err := startRigIn(dir, lagged(dir, latency), "", storageSite(addr), 4, callsPath)
	if err != nil {
		return err
	}
	defer stop()
	fmt.Printf("storage calls per 1,000 operations of one NDJSON job of GETs (parallel, concurrency 16), storage batch_lag %s\n\n", latency)
	fmt.Printf("%10s %9s %12s  %s\n", "ops", "wall", "per 1,000", "by method")
	var per []float64
	for _, n := range sizes {
		run, err := timedJob(r, n, true)
		if err != nil {
			return fmt.Errorf("%d operations: %w", n, err)
		}
		per = append(per, run.perThousand(n))
		fmt.Printf("%10d %7.2f s %12.1f  %s\n", n, run.wall.Seconds(), run.perThousand(n), breakdown(run.calls, float64(n)/1000))
	}
	spread := slices.Max(per) / slices.Min(per)
	ok := spread <= 1.1
	fmt.Printf("\nmost per 1,000 ops / fewest: %.2f (flat: ≤ 1.10) %s\n", spread, verdict(ok))
	if !ok && !informational {
		return fmt.Errorf("storage calls per 1,000 operations vary %.2f × across %v", spread, sizes)
	}
	return nil
}

// jobRun is what timedJob measured of one job.
type jobRun struct {
	wall, submit time.Duration
	calls        lagstore.Counts // made by the job's Caddy meanwhile; zero if not counted
}

func (r jobRun) perThousand(n int) float64 { return float64(r.calls.Total()) * 1000 / float64(n) }

func byWall(a, b jobRun) int { return int(a.wall - b.wall) }

// medianRun is the run of the median wall time (the upper one of an even
// count).
func medianRun(runs []jobRun) jobRun {
	s := slices.Clone(runs)
	slices.SortFunc(s, byWall)
	return s[len(s)/2]
}

// timedJob submits one NDJSON job of n GETs to r and follows it to its
// end, counting the storage calls r's Caddy made meanwhile when counted.
func timedJob(r rig, n int, counted bool) (jobRun, error) {
	const auth = "Bearer bench"
	var run jobRun
	var before lagstore.Counts
	if counted {
		var err error
		if before, err = storageCalls(r.client, r.base); err != nil {
			return run, err
		}
	}
	start := time.Now()
	id, err := submitNDJSON(r.client, r.base, auth, n)
	if err != nil {
		return run, err
	}
	run.submit = time.Since(start)
	last, _, err := awaitJob(r.client, r.base, id, auth, 50*time.Millisecond, 10*time.Minute)
	run.wall = time.Since(start)
	if err != nil {
		return run, err
	}
	if last.Get("status").String() != "completed" || last.Get("succeeded").Int() != int64(n) {
		return run, fmt.Errorf("job ended: %.300s", last.Raw)
	}
	if counted {
		after, err := storageCalls(r.client, r.base)
		if err != nil {
			return run, err
		}
		run.calls = after.Sub(before)
	}
	return run, nil
}

// breakdown lists the calls of c by method, each divided by per, leaving
// out those never made.
func breakdown(c lagstore.Counts, per float64) string {
	var parts []string
	for _, m := range []struct {
		name string
		n    int64
	}{{"store", c.Store}, {"load", c.Load}, {"delete", c.Delete}, {"exists", c.Exists},
		{"list", c.List}, {"stat", c.Stat}, {"lock", c.Lock}, {"unlock", c.Unlock}} {
		if m.n > 0 {
			parts = append(parts, fmt.Sprintf("%s %.1f", m.name, float64(m.n)/per))
		}
	}
	if len(parts) == 0 {
		return "none"
	}
	return strings.Join(parts, ", ")
}
