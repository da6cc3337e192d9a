package batch

import (
	"strings"
	"testing"
)

// Metrics are visible through Caddy's own metrics endpoint, and two batch
// handlers in one config share one set of collectors.
func TestMetricsEndpoint(t *testing.T) {
	be := newBackend(t)
	base := startCaddy(t, `
	metrics /metrics
	batch /batch /batch/* {
		async
	}
	batch /other {
		mode parallel
	}
	reverse_proxy `+be.addr())

	if status, _, body := send(t, "POST", base+"/batch", `[{"path":"/health"},{"path":"/users/404"}]`); status != 200 {
		t.Fatalf("%d %s", status, body)
	}
	if status, _, body := send(t, "POST", base+"/other", `{"batch":[{"path":"/health"}]}`); status != 200 {
		t.Fatalf("%d %s", status, body)
	}
	_, _, body := send(t, "POST", base+"/batch", `[{"path":"/health"}]`, alice, "Prefer: respond-async")
	waitJob(t, base+"/batch/"+mustJSON(t, body).Get("id").String(), alice, "completed")

	_, _, m := send(t, "GET", base+"/metrics", "")
	for _, want := range []string{
		`caddy_batch_batches_total{mode="sequential",outcome="completed_with_errors"} 1`,
		`caddy_batch_batches_total{mode="parallel",outcome="completed"} 1`,
		`caddy_batch_batches_total{mode="sequential",outcome="completed"} 1`,
		`caddy_batch_operations_total{class="2xx"} 3`,
		`caddy_batch_operations_total{class="4xx"} 1`,
		`caddy_batch_size_operations_count 3`,
		`caddy_batch_duration_seconds_count{mode="sequential"} 2`,
		`caddy_batch_async_jobs_total{state="queued"} 1`,
		`caddy_batch_async_jobs_total{state="completed"} 1`,
	} {
		if !strings.Contains(m, want+"\n") {
			t.Errorf("metrics lack %q", want)
		}
	}
	if t.Failed() {
		for _, line := range strings.Split(m, "\n") {
			if strings.HasPrefix(line, "caddy_batch") {
				t.Log(line)
			}
		}
	}
}
