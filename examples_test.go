package batch

import (
	"encoding/json"
	"os"
	"reflect"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
)

// The demo's Caddyfile and JSON config say the same thing.
func TestExamplesAgree(t *testing.T) {
	caddyfile, err := os.ReadFile("examples/Caddyfile")
	if err != nil {
		t.Fatal(err)
	}
	adapted, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt(caddyfile, map[string]any{"filename": "examples/Caddyfile"})
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range warnings {
		t.Errorf("examples/Caddyfile: %s", w)
	}
	written, err := os.ReadFile("examples/caddy.json")
	if err != nil {
		t.Fatal(err)
	}
	var a, b any
	if err := json.Unmarshal(adapted, &a); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(written, &b); err != nil {
		t.Fatalf("examples/caddy.json: %v", err)
	}
	a, b = normalizeConfig(t, a), normalizeConfig(t, b)
	if !reflect.DeepEqual(a, b) {
		ja, _ := json.MarshalIndent(a, "", "  ")
		jb, _ := json.MarshalIndent(b, "", "  ")
		t.Errorf("examples/Caddyfile adapts to\n%s\nbut examples/caddy.json says\n%s", ja, jb)
	}
}

// normalizeConfig drops what may differ in form only: server names, and
// durations written as "10s" rather than nanoseconds.
func normalizeConfig(t *testing.T, v any) any {
	switch v := v.(type) {
	case map[string]any:
		for k, val := range v {
			if s, ok := val.(string); ok && (k == "timeout" || k == "op_timeout" || k == "retention" || k == "progress_interval") {
				d, err := caddy.ParseDuration(s)
				if err != nil {
					t.Fatalf("%s: %v", k, err)
				}
				v[k] = float64(d)
				continue
			}
			if k == "servers" {
				if servers, ok := val.(map[string]any); ok {
					var list []any
					for _, s := range servers {
						list = append(list, normalizeConfig(t, s))
					}
					v[k] = list
					continue
				}
			}
			v[k] = normalizeConfig(t, val)
		}
	case []any:
		for i := range v {
			v[i] = normalizeConfig(t, v[i])
		}
	}
	return v
}
