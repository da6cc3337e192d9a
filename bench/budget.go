package main

import (
	"bytes"
	"fmt"
	"io"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// budget checks the handler's budget (max_inflight) against a backend that
// counts what it holds at once: 16 sync batches of 100 operations at once
// (parallel, concurrency 10: 160 would be in flight without the budget), to
// a handler with max_inflight 32 and, as the baseline, to one whose budget
// (1000) does not bind, one after the other in the same Caddy:
// `go run ./bench -budget`. It fails when the budgeted run ever had more
// than 32 in flight, or an operation did not answer 200.
func budget() error {
	const (
		batches, ops, concurrency = 16, 100, 10
		limit, unbound            = 32, 1000
		hold                      = 10 * time.Millisecond
	)
	var inflight, peak atomic.Int64
	backend, addr, err := serveBackend(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		n := inflight.Add(1)
		for p := peak.Load(); n > p && !peak.CompareAndSwap(p, n); p = peak.Load() {
		}
		// Deferred, it runs before the server sends the answer: a request
		// the proxy sends on receiving it is never counted with it.
		defer inflight.Add(-1)
		_, _ = io.Copy(io.Discard, r.Body)
		time.Sleep(hold)
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write(answer)
	}))
	if err != nil {
		return err
	}
	defer backend.Close()
	r, cleanup, err := startRig("", "", fmt.Sprintf(`
	batch /budget {
		mode parallel
		concurrency %[1]d
		max_inflight %[2]d
	}
	batch /unbound {
		mode parallel
		concurrency %[1]d
		max_inflight %[3]d
	}
	reverse_proxy %[4]s
`, concurrency, limit, unbound, addr), batches, "/")
	if err != nil {
		return err
	}
	defer cleanup()
	base, client := r.base, r.client

	var sb strings.Builder
	sb.WriteByte('[')
	for i := range ops {
		if i > 0 {
			sb.WriteByte(',')
		}
		fmt.Fprintf(&sb, `{"path":"/items/%d"}`, i)
	}
	sb.WriteByte(']')
	body := []byte(sb.String())

	// round sends the batches at once to path; it returns the most the
	// backend held at once and the time until the last answer.
	round := func(path string) (int64, time.Duration, error) {
		peak.Store(0)
		errs := make(chan error, batches)
		var wg sync.WaitGroup
		start := time.Now()
		for range batches {
			wg.Go(func() {
				if err := postBatch(client, base+path, body, ops, new(bytes.Buffer)); err != nil {
					errs <- err
				}
			})
		}
		wg.Wait()
		wall := time.Since(start)
		close(errs)
		return peak.Load(), wall, <-errs
	}
	fmt.Printf("budget: %d sync batches of %d operations at once (parallel, concurrency %d), backend holding each %s\n",
		batches, ops, concurrency, hold)
	total := time.Duration(batches*ops) * hold
	var failed error
	for _, r := range []struct {
		path string
		max  int
	}{{"/budget", limit}, {"/unbound", unbound}} {
		most, wall, err := round(r.path)
		// The least wall time: every operation held once, as many at once
		// as the budget and the batches' concurrency allow.
		ideal := total / time.Duration(min(r.max, batches*concurrency))
		line := fmt.Sprintf("  max_inflight %-5d max in flight %4d, wall %7s (ideal %s)", r.max, most, wall.Round(time.Millisecond), ideal)
		if r.max == limit {
			ok := most <= limit && err == nil
			line += fmt.Sprintf("  at most %d in flight, all answered 200: %s", limit, verdict(ok))
			if most > limit {
				failed = fmt.Errorf("%d operations in flight at once under max_inflight %d", most, limit)
			}
		} else {
			line += "  baseline"
		}
		fmt.Println(line)
		if err != nil && failed == nil {
			failed = fmt.Errorf("max_inflight %d: %w", r.max, err)
		}
	}
	return failed
}

func verdict(ok bool) string {
	if ok {
		return "PASS"
	}
	return "MISS"
}
