package batch

import (
	"encoding/json"
	"os"
	"reflect"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
)

// The demo's Caddyfile and its JSON twin say the same thing, and the
// Caddyfile is formatted as caddy fmt leaves it.
func TestExamplesAgree(t *testing.T) {
	t.Parallel()
	caddyfile, err := os.ReadFile("examples/Caddyfile")
	if err != nil {
		t.Fatal(err)
	}
	adapted, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt(caddyfile, map[string]any{"filename": "examples/Caddyfile"})
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range warnings {
		t.Errorf("examples/Caddyfile: %s", w) // "not formatted" among them
	}
	written, err := os.ReadFile("examples/caddy.json")
	if err != nil {
		t.Fatal(err)
	}
	var want, got any
	if err := json.Unmarshal(adapted, &want); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(written, &got); err != nil {
		t.Fatalf("examples/caddy.json: %v", err)
	}
	normalizeDurations(t, got)
	if !reflect.DeepEqual(want, got) {
		a, _ := json.MarshalIndent(want, "", "\t")
		t.Errorf("examples/caddy.json differs from examples/Caddyfile, which adapts to\n%s", a)
	}
}

// durationKeys are the fields of the examples that hold a caddy.Duration.
var durationKeys = map[string]bool{
	"grace_period": true, "timeout": true, "op_timeout": true,
	"retention": true, "progress_interval": true,
}

// normalizeDurations turns durations written for people ("10s") into the
// nanoseconds the adapter writes; caddy.Duration reads either.
func normalizeDurations(t *testing.T, v any) {
	t.Helper()
	switch v := v.(type) {
	case map[string]any:
		for k, val := range v {
			if s, ok := val.(string); ok && durationKeys[k] {
				d, err := caddy.ParseDuration(s)
				if err != nil {
					t.Fatalf("examples/caddy.json: %s: %v", k, err)
				}
				v[k] = float64(d)
				continue
			}
			normalizeDurations(t, val)
		}
	case []any:
		for _, val := range v {
			normalizeDurations(t, val)
		}
	}
}
