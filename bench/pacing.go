package main

import (
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tidwall/gjson"
)

// paceBurst is the burst the rate-limited backend allows beyond its rate:
// small, so that what a client sends at once is soon refused.
const paceBurst = 20

// pacing measures adaptive pacing against a backend allowing rate requests
// a second (a token bucket of paceBurst; beyond it, 429 with Retry-After in
// whole seconds, at least 1): `go run ./bench -pacing -n 5000 -rate 200`.
// In turn, each with its own backend and Caddy:
//
//   - an async job of n POSTs (parallel, concurrency 16) to the backend
//     answering 429 with Retry-After: it should end within 1.1 × n/rate,
//     with no result 429, and at most 5% of the backend's answers 429;
//   - the same job to the same limit sending RateLimit-Policy and
//     RateLimit (draft-ietf-httpapi-ratelimit-headers 08 on) with every
//     answer: it should be answered no 429;
//   - the baseline, what a client gets without pacing: the same n POSTs as
//     sync batches of 100 (parallel, concurrency 16, "pacing off"), one
//     after another.
//
// It fails on any target missed, unless informational.
func pacing(n, rate int, informational bool) error {
	if n < 1 || rate < 1 {
		return errors.New("-n and -rate must be at least 1")
	}
	ideal := time.Duration(float64(n) / float64(rate) * float64(time.Second))
	fmt.Printf("pacing: %d POSTs, parallel, concurrency 16, max_inflight 32 (default), to a backend allowing %d requests/s\n", n, rate)
	fmt.Printf("(token bucket, burst %d; beyond it 429 with Retry-After in whole seconds, at least 1); N/R = %s\n\n", paceBurst, ideal.Round(time.Millisecond))
	type scenario struct {
		title   string
		headers bool // the backend sends RateLimit headers
		job     bool // an async job, or the baseline's sync batches
	}
	scenarios := []scenario{
		{"job, 429 + Retry-After", false, true},
		{"job, RateLimit headers", true, true},
		{"baseline: sync batches, pacing off", false, false},
	}
	fmt.Printf("%-36s %9s %6s %8s %18s %11s %13s\n", "scenario", "wall", "×N/R", "answers", "429s (% answers)", "results 429", "other non-2xx")
	var missed []string
	for _, sc := range scenarios {
		m, err := paceScenario(n, rate, sc.headers, sc.job, 15*ideal+30*time.Second)
		if err != nil {
			return fmt.Errorf("%s: %w", sc.title, err)
		}
		share := 0.0
		if m.answers > 0 {
			share = float64(m.refused) / float64(m.answers)
		}
		ratio := m.wall.Seconds() / ideal.Seconds()
		fmt.Printf("%-36s %8.1fs %6.2f %8d %9d (%5.1f%%) %11d %13d\n", sc.title, m.wall.Seconds(), ratio, m.answers, m.refused, 100*share, m.results429, m.other)
		type target struct {
			name string
			ok   bool
		}
		var targets []target
		switch {
		case sc.job && !sc.headers:
			targets = []target{
				{"ends within 1.1 × N/R", m.ended && ratio <= 1.1},
				{"no result 429", m.ended && m.results429 == 0},
				{"at most 5% of answers 429", share <= 0.05},
			}
		case sc.job:
			targets = []target{{"no 429 answered", m.ended && m.refused == 0}}
		}
		var verdicts []string
		for _, t := range targets {
			verdicts = append(verdicts, t.name+": "+verdict(t.ok))
			if !t.ok {
				missed = append(missed, sc.title+": "+t.name)
			}
		}
		if m.note != "" {
			verdicts = append(verdicts, m.note)
		}
		if len(verdicts) > 0 {
			fmt.Printf("  %s\n", strings.Join(verdicts, "; "))
		}
	}
	if len(missed) > 0 && !informational {
		return fmt.Errorf("missed: %s", strings.Join(missed, "; "))
	}
	return nil
}

// paceMeasure is what one scenario of pacing measured.
type paceMeasure struct {
	wall             time.Duration // from the first batch sent, or the job's submission, to its end (seen polling every 100 ms)
	answers, refused int64         // by the backend: all, and 429
	results429       int           // results that ended 429
	other            int           // results neither 2xx nor 429
	ended            bool          // every operation has its result
	note             string
}

// paceScenario runs the n POSTs against a fresh backend allowing rate
// requests a second, and a fresh Caddy (storage, gate and pacer): as one
// async job when job is set, canceled if it runs longer than limit; else
// as sync batches of 100.
func paceScenario(n, rate int, headers, job bool, limit time.Duration) (paceMeasure, error) {
	lim := &limited{rate: float64(rate), headers: headers}
	backend, addr, err := serveBackend(lim)
	if err != nil {
		return paceMeasure{}, err
	}
	defer backend.Close()
	// "pacing off" is the default, and applies to sync batches only: jobs
	// are always adaptive.
	r, cleanup, err := startRig("batch-pacing", "", fmt.Sprintf(`
	batch /batch /batch/* {
		mode parallel
		concurrency 16
		pacing off
		async {
			retention 1h
		}
	}
	reverse_proxy %s
`, addr), 4, "/batch/00000000000000000000000000000000")
	if err != nil {
		return paceMeasure{}, err
	}
	defer cleanup()
	base, client := r.base, r.client
	ops := func(from, to int) string {
		var sb strings.Builder
		sb.WriteByte('[')
		for i := from; i < to; i++ {
			if i > from {
				sb.WriteByte(',')
			}
			fmt.Fprintf(&sb, `{"id":"o%d","method":"POST","path":"/items","body":{"n":%d}}`, i, i)
		}
		sb.WriteByte(']')
		return sb.String()
	}
	var m paceMeasure
	count := func(results gjson.Result) int {
		k := 0
		results.ForEach(func(_, res gjson.Result) bool {
			k++
			switch s := res.Get("status").Int(); {
			case s == http.StatusTooManyRequests:
				m.results429++
			case s < 200 || s > 299:
				m.other++
			}
			return true
		})
		return k
	}
	const auth = "Bearer bench"
	if !job {
		start := time.Now()
		for from := 0; from < n; from += 100 {
			to := min(from+100, n)
			out, status, _, err := send(client, http.MethodPost, base+"/batch", ops(from, to), auth, "")
			if err != nil || status != http.StatusOK {
				return m, fmt.Errorf("sync batch: %d %v %.200s", status, err, out)
			}
			if k := count(gjson.Parse(out)); k != to-from {
				return m, fmt.Errorf("sync batch of %d answered %d results", to-from, k)
			}
		}
		m.wall, m.ended = time.Since(start), true
		m.answers, m.refused = lim.answers.Load(), lim.refused.Load()
		return m, nil
	}

	body := ops(0, n)
	start := time.Now()
	out, status, _, err := send(client, http.MethodPost, base+"/batch", body, auth, "respond-async")
	if err != nil || status != http.StatusAccepted {
		return m, fmt.Errorf("submit: %d %v %.200s", status, err, out)
	}
	id := gjson.Get(out, "id").String()
	last, _, err := awaitJob(client, base, id, auth, 100*time.Millisecond, limit)
	m.wall = time.Since(start)
	if errors.Is(err, errJobTimeout) {
		// Bounded: what has not started is skipped, and the rest counted.
		m.note = fmt.Sprintf("canceled after %s with %d of %d done", limit, last.Get("completed").Int(), n)
		if out, status, _, err := send(client, http.MethodDelete, base+"/batch/"+id, "", auth, ""); err != nil || status != http.StatusAccepted && status != http.StatusOK {
			return m, fmt.Errorf("cancel: %d %v %.200s", status, err, out)
		}
		last, _, err = awaitJob(client, base, id, auth, 100*time.Millisecond, time.Minute)
	}
	if err != nil {
		return m, err
	}
	m.answers, m.refused = lim.answers.Load(), lim.refused.Load()
	out, status, _, err = send(client, http.MethodGet, base+"/batch/"+id+"/results", "", auth, "")
	if err != nil || status != http.StatusOK {
		return m, fmt.Errorf("results: %d %v %.200s", status, err, out)
	}
	k := count(gjson.Get(out, "results"))
	m.ended = m.note == "" && last.Get("status").String() == "completed" && k == n
	if !m.ended && m.note == "" {
		m.note = fmt.Sprintf("job ended %s with %d results of %d", last.Get("status").String(), k, n)
	}
	return m, nil
}

// limited is a backend allowing rate requests a second: a token bucket of
// paceBurst tokens. Beyond it, it answers 429 with Retry-After, the whole
// seconds (at least 1) until a token is back. With headers, every answer
// also tells its quota: RateLimit-Policy q=rate per w=1 second, and
// RateLimit r=the tokens left, t=the seconds until the bucket is full
// again, rounded up (the draft's t is an integer).
type limited struct {
	rate    float64
	headers bool

	mu     sync.Mutex
	tokens float64
	at     time.Time // when tokens was counted; zero: full

	answers, refused atomic.Int64
}

func (l *limited) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	_, _ = io.Copy(io.Discard, r.Body)
	now := time.Now()
	l.mu.Lock()
	if l.at.IsZero() {
		l.tokens = paceBurst
	} else {
		l.tokens = min(paceBurst, l.tokens+l.rate*now.Sub(l.at).Seconds())
	}
	l.at = now
	ok := l.tokens >= 1
	if ok {
		l.tokens--
	}
	left := l.tokens
	l.mu.Unlock()
	l.answers.Add(1)
	h := w.Header()
	if l.headers {
		h.Set("RateLimit-Policy", fmt.Sprintf(`"bucket";q=%d;w=1`, int(l.rate)))
		h.Set("RateLimit", fmt.Sprintf(`"bucket";r=%d;t=%d`, int(left), int(math.Ceil((paceBurst-left)/l.rate))))
	}
	if !ok {
		l.refused.Add(1)
		h.Set("Retry-After", strconv.Itoa(max(1, int(math.Ceil((1-left)/l.rate)))))
		h.Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusTooManyRequests)
		_, _ = w.Write([]byte(`{"error":"too many requests"}`))
		return
	}
	h.Set("Content-Type", "application/json")
	_, _ = w.Write(answer)
}
