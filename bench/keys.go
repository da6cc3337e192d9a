package main

import (
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/tidwall/gjson"
)

// keyOrder times per-key ordering (issue #24): 1,000 operations over 50
// keys at concurrency 20, to a backend holding each 5 ms and counting
// each key's operations in flight and their order itself, as a sync batch
// (keys spread at random, then sorted by key, as integrators sort records
// by parent) and as a streamed job of five chunks; each with keys and as
// the same operations without, taking turns: `go run ./bench -keys`. The
// target: with keys within 1.3 × the time without. It fails when a key
// ever had two operations at the backend at once, or one arrived before
// an earlier one of its key.
func keyOrder(rounds int, informational bool) error {
	const (
		keys, concurrency = 50, 20
		hold              = 5 * time.Millisecond
	)
	kb := &keyCounter{}
	kb.reset()
	backend, addr, err := serveBackend(kb)
	if err != nil {
		return err
	}
	defer backend.Close()
	r, cleanup, err := startRig("batch-keys", "", fmt.Sprintf(`
	batch /batch /batch/* {
		mode parallel
		concurrency %d
		max_ops 1000
		async {
			retention 1h
		}
	}
	reverse_proxy %s
`, concurrency, addr), 2, "/batch/00000000000000000000000000000000")
	if err != nil {
		return err
	}
	defer cleanup()
	base, client := r.base, r.client
	const auth = "Bearer bench"

	// ops returns n operations over the keys, spread at random (the same
	// each run) or sorted by key, as JSON objects, with or without their
	// key.
	ops := func(n int, sorted, keyed bool) []string {
		rng := rand.New(rand.NewPCG(24, 2))
		acct := make([]int, n)
		for i := range acct {
			acct[i] = rng.IntN(keys)
		}
		if sorted {
			slices.Sort(acct)
		}
		seq := make([]int, keys)
		out := make([]string, n)
		for i, a := range acct {
			key := ""
			if keyed {
				key = fmt.Sprintf(`,"key":"acct-%d"`, a)
			}
			out[i] = fmt.Sprintf(`{"path":"/k/acct-%d/%d"%s}`, a, seq[a], key)
			seq[a]++
		}
		return out
	}
	syncRun := func(sorted, keyed bool) (time.Duration, error) {
		body := "[" + strings.Join(ops(1000, sorted, keyed), ",") + "]"
		start := time.Now()
		out, status, _, err := send(client, http.MethodPost, base+"/batch", body, auth, "")
		took := time.Since(start)
		if err != nil || status != http.StatusOK {
			return 0, fmt.Errorf("batch: %d %v %.200s", status, err, out)
		}
		if n := strings.Count(out, `"status":200`); n != 1000 {
			return 0, fmt.Errorf("batch: %d of 1000 answered 200", n)
		}
		return took, nil
	}
	jobRun := func(sorted, keyed bool) (time.Duration, error) {
		const n = 5000
		body := strings.Join(ops(n, sorted, keyed), "\n")
		req, _ := http.NewRequest(http.MethodPost, base+"/batch", strings.NewReader(body))
		req.Header.Set("Content-Type", "application/x-ndjson")
		req.Header.Set("Authorization", auth)
		resp, err := client.Do(req)
		if err != nil {
			return 0, err
		}
		out, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusAccepted {
			return 0, fmt.Errorf("submit: %d %s", resp.StatusCode, out)
		}
		id := gjson.GetBytes(out, "id").String()
		p, _, err := awaitJob(client, base, id, auth, 50*time.Millisecond, 2*time.Minute)
		if err != nil {
			return 0, err
		}
		if p.Get("status").String() != "completed" || p.Get("succeeded").Int() != n {
			return 0, fmt.Errorf("job ended: %s", p.Raw)
		}
		// The job's own times: the polls do not count.
		started, err1 := time.Parse(time.RFC3339Nano, p.Get("started_at").String())
		ended, err2 := time.Parse(time.RFC3339Nano, p.Get("completed_at").String())
		if err1 != nil || err2 != nil {
			return 0, fmt.Errorf("job times: %s", p.Raw)
		}
		return ended.Sub(started), nil
	}

	fmt.Printf("keys: operations over %d keys at concurrency %d, key_concurrency 1, the backend holding each %s; %d rounds, keyed and unkeyed taking turns\n",
		keys, concurrency, hold, rounds)
	var failed []string
	for _, sc := range []struct {
		name   string
		sorted bool
		run    func(sorted, keyed bool) (time.Duration, error)
		ideal  time.Duration
	}{
		{"sync batch of 1,000, keys at random", false, syncRun, 1000 * hold / concurrency},
		{"sync batch of 1,000, sorted by key", true, syncRun, 1000 * hold / concurrency},
		{"streamed job of 5,000 (5 chunks), keys at random", false, jobRun, 5000 * hold / concurrency},
		{"streamed job of 5,000 (5 chunks), sorted by key", true, jobRun, 5000 * hold / concurrency},
	} {
		var with, without []time.Duration
		for range rounds {
			d, err := sc.run(sc.sorted, false)
			if err != nil {
				return fmt.Errorf("%s, without keys: %w", sc.name, err)
			}
			without = append(without, d)
			kb.reset()
			if d, err = sc.run(sc.sorted, true); err != nil {
				return fmt.Errorf("%s, with keys: %w", sc.name, err)
			}
			with = append(with, d)
			if most, disorder := kb.result(); most > 1 || disorder != "" {
				return fmt.Errorf("%s: %d operations of one key at the backend at once; out of order: %s", sc.name, most, disorder)
			}
		}
		slices.Sort(with)
		slices.Sort(without)
		w, wo := with[len(with)/2], without[len(without)/2]
		ratio := float64(w) / float64(wo)
		ok := ratio <= 1.3
		fmt.Printf("  %-50s without keys %7s, with %7s (ideal %s): %4.2f× (target ≤ 1.3) %s\n",
			sc.name, wo.Round(time.Millisecond), w.Round(time.Millisecond), sc.ideal, ratio, verdict(ok))
		if !ok {
			failed = append(failed, fmt.Sprintf("%s: %.2f×", sc.name, ratio))
		}
	}
	fmt.Println("  with keys: never two operations of one key at the backend at once, each key's in order")
	if len(failed) > 0 && !informational {
		return fmt.Errorf("targets missed: %s", strings.Join(failed, "; "))
	}
	return nil
}

// keyCounter is the backend of keyOrder: /k/KEY/SEQ held 5 ms, counting
// each key's operations in flight and whether they arrive in SEQ order.
type keyCounter struct {
	mu       sync.Mutex
	inFlight map[string]int
	last     map[string]int
	most     int
	disorder string
}

func (kc *keyCounter) reset() {
	kc.mu.Lock()
	kc.inFlight, kc.last, kc.most, kc.disorder = map[string]int{}, map[string]int{}, 0, ""
	kc.mu.Unlock()
}

// result is the most operations of one key at once, and the first that
// arrived out of its key's order, since the last reset.
func (kc *keyCounter) result() (int, string) {
	kc.mu.Lock()
	defer kc.mu.Unlock()
	return kc.most, kc.disorder
}

func (kc *keyCounter) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	key, seq := "", -1
	if rest, ok := strings.CutPrefix(r.URL.Path, "/k/"); ok {
		k, s, _ := strings.Cut(rest, "/")
		key = k
		_, _ = fmt.Sscan(s, &seq)
	}
	kc.mu.Lock()
	kc.inFlight[key]++
	kc.most = max(kc.most, kc.inFlight[key])
	if last, seen := kc.last[key]; seen && seq <= last && kc.disorder == "" {
		kc.disorder = fmt.Sprintf("key %s: %d after %d", key, seq, last)
	}
	kc.last[key] = seq
	kc.mu.Unlock()
	time.Sleep(5 * time.Millisecond)
	// Counted out before the answer goes.
	kc.mu.Lock()
	kc.inFlight[key]--
	kc.mu.Unlock()
	w.Header().Set("Content-Type", "application/json")
	fmt.Fprintf(w, `{"key":%q,"seq":%d}`, key, seq)
}
