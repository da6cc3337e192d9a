package main

import (
	"testing"
	"time"
)

// progressAt samples, every 250 ms for d, a job completing rate(t)
// operations a second at t.
func progressAt(d time.Duration, rate func(t time.Duration) float64) []progressSample {
	start := time.Unix(0, 0)
	samples := []progressSample{{at: start}}
	done := 0.0
	for t := time.Duration(0); t < d; t += 250 * time.Millisecond {
		done += rate(t) / 4
		samples = append(samples, progressSample{at: start.Add(t + 250*time.Millisecond), completed: int64(done)})
	}
	return samples
}

func TestLongestUnder(t *testing.T) {
	steady := func(time.Duration) float64 { return 100 }
	between := func(from, to time.Duration, r float64) func(time.Duration) float64 {
		return func(t time.Duration) float64 {
			if t >= from && t < to {
				return r
			}
			return 100
		}
	}
	for _, c := range []struct {
		name string
		rate func(time.Duration) float64
		want time.Duration
		at   time.Duration // when the longest began, to within 500 ms
	}{
		{"steady above", steady, 0, 0},
		{"steady just above", func(time.Duration) float64 { return 60 }, 0, 0},
		{"steady below", func(time.Duration) float64 { return 40 }, 10 * time.Second, 0},
		{"never progressing", func(time.Duration) float64 { return 0 }, 10 * time.Second, 0},
		{"stalled at the start", between(0, 5*time.Second, 0), 5 * time.Second, 0},
		{"stalled 3 s in the middle", between(4*time.Second, 7*time.Second, 0), 3 * time.Second, 4 * time.Second},
		// The window's rate crosses 58/s at 52% into the slow part and
		// out of it: read to within two samples.
		{"slow 3 s in the middle", between(4*time.Second, 7*time.Second, 20), 2500 * time.Millisecond, 4 * time.Second},
		{"two stalls: the longer", func(t time.Duration) float64 {
			if t >= 2*time.Second && t < 3*time.Second || t >= 5*time.Second && t < 8*time.Second {
				return 0
			}
			return 100
		}, 3 * time.Second, 5 * time.Second},
		{"a dip shorter than the window", between(4*time.Second, 4250*time.Millisecond, 0), 0, 0},
	} {
		got, at := longestUnder(progressAt(10*time.Second, c.rate), 58)
		if got != c.want {
			t.Errorf("%s: %s, want %s", c.name, got, c.want)
		}
		if got > 0 && (at < c.at-500*time.Millisecond || at > c.at+500*time.Millisecond) {
			t.Errorf("%s: began at %s, want %s", c.name, at, c.at)
		}
	}
	if got, _ := longestUnder(nil, 58); got != 0 {
		t.Errorf("no samples: %s", got)
	}
}
