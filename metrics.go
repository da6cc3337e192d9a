package batch

import (
	"errors"
	"strconv"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the handler's Prometheus collectors, registered in the
// config's registry; several batch handlers of one config share them.
type metrics struct {
	batches    *prometheus.CounterVec   // by mode and outcome
	operations *prometheus.CounterVec   // by status class
	size       prometheus.Histogram     // operations per batch
	duration   *prometheus.HistogramVec // by mode
	jobs       *prometheus.CounterVec   // async job transitions, by state
	webhooks   *prometheus.CounterVec   // deliveries, by outcome
	pacing     *prometheus.CounterVec   // what the API's 429s made the pacer do
	turnWait   prometheus.Histogram     // waits for a turn downstream
	retries    *prometheus.CounterVec   // operations sent again, by the status that made them
}

const metricsNamespace, metricsSubsystem = "caddy", "batch"

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	opts := func(name, help string) (string, string, string, string) {
		return metricsNamespace, metricsSubsystem, name, help
	}
	counter := func(name, help string, labels ...string) *prometheus.CounterVec {
		ns, sub, n, h := opts(name, help)
		return prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: n, Help: h}, labels)
	}
	m := &metrics{
		batches:    counter("batches_total", "Batches answered, by mode and outcome (the envelope status).", "mode", "outcome"),
		operations: counter("operations_total", "Operations of batches, by status class (2xx, 4xx, ...).", "class"),
		jobs:       counter("async_jobs_total", "Async batch jobs entering a state (queued, running, completed, error, canceled, stopped, expired).", "state"),
		webhooks:   counter("webhook_deliveries_total", "Webhook delivery attempts, by outcome (delivered, failed, given_up).", "outcome"),
		pacing: counter("pacing_events_total",
			"What 429s made adaptive pacing do: paused (every adaptive operation, for a Retry-After) or slowed (the learned rate lowered).", "event"),
		retries: counter("retries_total", "Operations sent again, by the status of the answer that made them (retry, and 429s under adaptive pacing).", "status"),
		turnWait: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: "turn_wait_seconds",
			Help:    "Time operations waited for a turn downstream (max_inflight, rate, pacing).",
			Buckets: []float64{0.001, 0.01, 0.1, 0.5, 1, 5, 10, 30, 60},
		}),
		size: prometheus.NewHistogram(prometheus.HistogramOpts{
			Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: "size_operations",
			Help:    "Operations per batch.",
			Buckets: []float64{1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000, 10000},
		}),
		duration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: metricsNamespace, Subsystem: metricsSubsystem, Name: "duration_seconds",
			Help:    "Time to run a batch, by mode.",
			Buckets: prometheus.DefBuckets,
		}, []string{"mode"}),
	}
	var err error
	m.batches, err = register(reg, m.batches)
	if err == nil {
		m.operations, err = register(reg, m.operations)
	}
	if err == nil {
		m.jobs, err = register(reg, m.jobs)
	}
	if err == nil {
		m.webhooks, err = register(reg, m.webhooks)
	}
	if err == nil {
		m.size, err = register(reg, m.size)
	}
	if err == nil {
		m.duration, err = register(reg, m.duration)
	}
	if err == nil {
		m.pacing, err = register(reg, m.pacing)
	}
	if err == nil {
		m.turnWait, err = register(reg, m.turnWait)
	}
	if err == nil {
		m.retries, err = register(reg, m.retries)
	}
	return m, err
}

// register registers c, or returns the collector already registered in its
// place by another batch handler of the same config.
func register[C prometheus.Collector](reg prometheus.Registerer, c C) (C, error) {
	if reg == nil {
		return c, nil
	}
	if err := reg.Register(c); err != nil {
		var are prometheus.AlreadyRegisteredError
		if errors.As(err, &are) {
			if existing, ok := are.ExistingCollector.(C); ok {
				return existing, nil
			}
		}
		return c, err
	}
	return c, nil
}

// statusClass is "2xx" for 204, and so on.
func statusClass(status int) string {
	return strconv.Itoa(status/100) + "xx"
}
