package batch

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

func TestUnmarshalCaddyfile(t *testing.T) {
	d := caddyfile.NewTestDispenser(`batch {
		mode parallel
		concurrency 4
		atomicity stop_on_error
		max_ops 500
		max_body_size 2MiB
		max_response_size 512KB
		timeout 2m
		op_timeout 1500ms
		methods GET POST
		paths /users /users/*
		inherit_headers Authorization Accept
		allow_forwarded_headers X-Forwarded-Proto
		retry_429 2
		async {
			retention 2h
			workers 3
			owner {http.request.header.X-Api-Key}
			webhook https://hooks.example.com/b {
				secret s3cret
				events completed progress
				progress_interval 5s
				max_attempts 3
			}
		}
	}`)
	var h Handler
	if err := h.UnmarshalCaddyfile(d); err != nil {
		t.Fatal(err)
	}
	want := Handler{
		Mode: "parallel", Concurrency: 4, Atomicity: "stop_on_error", MaxOps: 500,
		MaxBodySize: 2 << 20, MaxResponseSize: 512_000,
		Timeout: caddy.Duration(2 * time.Minute), OpTimeout: caddy.Duration(1500 * time.Millisecond),
		Methods: []string{"GET", "POST"}, Paths: []string{"/users", "/users/*"},
		InheritHeaders: []string{"Authorization", "Accept"}, AllowForwardedHeaders: []string{"X-Forwarded-Proto"},
		Retry429: 2,
		Async: &AsyncConfig{
			Retention: caddy.Duration(2 * time.Hour), Workers: 3, Owner: "{http.request.header.X-Api-Key}",
			Webhook: &Webhook{URL: "https://hooks.example.com/b", Secret: "s3cret", Events: []string{"completed", "progress"},
				ProgressInterval: caddy.Duration(5 * time.Second), MaxAttempts: 3},
		},
	}
	got, _ := json.Marshal(&h)
	exp, _ := json.Marshal(&want)
	if string(got) != string(exp) {
		t.Errorf("got  %s\nwant %s", got, exp)
	}
}

func TestUnmarshalCaddyfileErrors(t *testing.T) {
	bad := map[string]string{
		"argument":          `batch extra`,
		"unknown":           "batch {\n bogus 1\n}",
		"twice":             "batch {\n mode parallel\n mode sequential\n}",
		"missing value":     "batch {\n mode\n}",
		"extra value":       "batch {\n mode parallel sequential\n}",
		"bad number":        "batch {\n max_ops lots\n}",
		"zero":              "batch {\n concurrency 0\n}",
		"bad size":          "batch {\n max_body_size huge\n}",
		"bad duration":      "batch {\n timeout soon\n}",
		"negative duration": "batch {\n op_timeout -1s\n}",
		"empty list":        "batch {\n methods\n}",
		"async unknown":     "batch {\n async {\n  bogus\n }\n}",
		"async twice":       "batch {\n async {\n  workers 1\n  workers 2\n }\n}",
		"webhook no url":    "batch {\n async {\n  webhook {\n   secret x\n  }\n }\n}",
		"webhook unknown":   "batch {\n async {\n  webhook https://x {\n   bogus\n  }\n }\n}",
	}
	for name, input := range bad {
		t.Run(name, func(t *testing.T) {
			var h Handler
			if err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(input)); err == nil {
				t.Errorf("%q: no error", input)
			}
		})
	}
}

func TestValidateConfig(t *testing.T) {
	bad := map[string]*Handler{
		"mode":               {Mode: "fast"},
		"atomicity":          {Atomicity: "some"},
		"concurrency":        {Concurrency: -1},
		"forwarded":          {AllowForwardedHeaders: []string{"Authorization"}},
		"retry_429 negative": {Retry429: -1},
	}
	for name, h := range bad {
		t.Run(name, func(t *testing.T) {
			if err := h.Provision(caddy.Context{}); err == nil {
				if err := h.Validate(); err == nil {
					t.Error("no error")
				}
			}
		})
	}
	var webhookWithoutSecret = Handler{Async: &AsyncConfig{Webhook: &Webhook{URL: "https://x"}}}
	if err := webhookWithoutSecret.Async.Webhook.provision(); err == nil || !strings.Contains(err.Error(), "secret") {
		t.Errorf("a webhook without a secret: %v", err)
	}
}

// The directive takes several paths as its matcher, or one matcher as usual.
func TestDirectiveMatchers(t *testing.T) {
	adapt := func(site string) (string, error) {
		out, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(":80 {\n"+site+"\n}"), nil)
		return string(out), err
	}
	cases := map[string]string{
		"batch /batch /batch/*": `[{"path":["/batch","/batch/*"]}]`,
		"batch /one":            `[{"path":["/one"]}]`,
		"@b path /x\nbatch @b":  `[{"path":["/x"]}]`,
	}
	for site, want := range cases {
		out, err := adapt(site)
		if err != nil {
			t.Errorf("%q: %v", site, err)
			continue
		}
		var cfg struct {
			Apps struct {
				HTTP struct {
					Servers map[string]struct {
						Routes []struct {
							Match  json.RawMessage `json:"match"`
							Handle []map[string]any
						} `json:"routes"`
					} `json:"servers"`
				} `json:"http"`
			} `json:"apps"`
		}
		if err := json.Unmarshal([]byte(out), &cfg); err != nil {
			t.Fatal(err)
		}
		for _, srv := range cfg.Apps.HTTP.Servers {
			var got, exp any
			_ = json.Unmarshal(srv.Routes[0].Match, &got)
			_ = json.Unmarshal([]byte(want), &exp)
			if !reflect.DeepEqual(got, exp) || srv.Routes[0].Handle[0]["handler"] != "batch" {
				t.Errorf("%q: route %s %v, want match %s", site, srv.Routes[0].Match, srv.Routes[0].Handle, want)
			}
		}
	}
	if out, err := adapt("batch"); err != nil || !strings.Contains(out, `"handler":"batch"`) {
		t.Errorf("batch with no matcher: %v %s", err, out)
	}
	if _, err := adapt("batch /a notapath"); err == nil {
		t.Error("batch /a notapath: no error")
	}
}
