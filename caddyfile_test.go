package batch

import (
	"context"
	"encoding/json"
	"fmt"
	"reflect"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// Caddyfile and JSON configuration, one subdirective or field at a time.
// caddyfile_test.go holds the whole-block and matcher tests.

// cfJSON is h as JSON, or a failure.
func cfJSON(t *testing.T, h any) string {
	t.Helper()
	out, err := json.Marshal(h)
	if err != nil {
		t.Fatal(err)
	}
	return string(out)
}

// cfSameJSON reports whether two JSON texts hold the same value.
func cfSameJSON(t *testing.T, a, b string) bool {
	t.Helper()
	var va, vb any
	if err := json.Unmarshal([]byte(a), &va); err != nil {
		t.Fatalf("%s: %v", a, err)
	}
	if err := json.Unmarshal([]byte(b), &vb); err != nil {
		t.Fatalf("%s: %v", b, err)
	}
	return reflect.DeepEqual(va, vb)
}

func TestCaddyfileSubdirectives(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name, input, want string // want: the handler as JSON
	}{
		{"bare", `batch`, `{}`},
		{"empty block", "batch {\n}", `{}`},
		{"mode sequential", "batch {\n mode sequential\n}", `{"mode":"sequential"}`},
		{"skip_operation_logs", "batch {\n skip_operation_logs\n}", `{"skip_operation_logs":true}`},
		{"log_operations off, its older name", "batch {\n log_operations off\n}", `{"skip_operation_logs":true}`},
		{"log_operations on", "batch {\n log_operations on\n}", `{}`},
		{"mode parallel", "batch {\n\tmode parallel\n}", `{"mode":"parallel"}`},
		{"atomicity", "batch {\n atomicity all_or_nothing\n}", `{"atomicity":"all_or_nothing"}`},
		{"concurrency", "batch {\n concurrency 1\n}", `{"concurrency":1}`},
		{"concurrency large", "batch {\n concurrency 256\n}", `{"concurrency":256}`},
		{"key_concurrency", "batch {\n key_concurrency 4\n}", `{"key_concurrency":4}`},
		{"max_ops", "batch {\n max_ops 1000\n}", `{"max_ops":1000}`},
		{"size in bytes", "batch {\n max_body_size 1024\n}", `{"max_body_size":1024}`},
		{"size MB", "batch {\n max_body_size 1MB\n}", `{"max_body_size":1000000}`},
		{"size mb", "batch {\n max_body_size 1mb\n}", `{"max_body_size":1000000}`},
		{"size KiB", "batch {\n max_body_size 512KiB\n}", `{"max_body_size":524288}`},
		{"size MiB", "batch {\n max_body_size 10MiB\n}", `{"max_body_size":10485760}`},
		{"size fraction", "batch {\n max_body_size 1.5MB\n}", `{"max_body_size":1500000}`},
		{"size GiB", "batch {\n max_response_size 2GiB\n}", `{"max_response_size":2147483648}`},
		{"size kB", "batch {\n max_response_size 64kB\n}", `{"max_response_size":64000}`},
		{"max_reference_size", "batch {\n max_reference_size 1MiB\n}", `{"max_reference_size":1048576}`},
		{"timeout seconds", "batch {\n timeout 90s\n}", `{"timeout":90000000000}`},
		{"timeout compound", "batch {\n timeout 1h30m\n}", `{"timeout":5400000000000}`},
		{"timeout days", "batch {\n timeout 1d\n}", `{"timeout":86400000000000}`},
		{"op_timeout ms", "batch {\n op_timeout 250ms\n}", `{"op_timeout":250000000}`},
		{"methods", "batch {\n methods GET POST\n}", `{"methods":["GET","POST"]}`},
		{"one method", "batch {\n methods get\n}", `{"methods":["get"]}`},
		{"paths", "batch {\n paths /api/* /v2/users /exact\n}", `{"paths":["/api/*","/v2/users","/exact"]}`},
		{"inherit_headers", "batch {\n inherit_headers Authorization Cookie X-Request-Id\n}", `{"inherit_headers":["Authorization","Cookie","X-Request-Id"]}`},
		{"allow_forwarded_headers", "batch {\n allow_forwarded_headers X-Forwarded-Proto X-Real-IP Forwarded\n}",
			`{"allow_forwarded_headers":["X-Forwarded-Proto","X-Real-IP","Forwarded"]}`},
		{"retry_429 zero", "batch {\n retry_429 0\n}", `{}`},
		{"retry_429", "batch {\n retry_429 3\n}", `{"retry_429":3}`},
		{"retry", "batch {\n retry {\n  statuses 429 502 503 504\n  max_attempts 4\n  backoff 100ms 5s\n  methods all\n }\n}",
			`{"retry":{"statuses":[429,502,503,504],"max_attempts":4,"backoff":[100000000,5000000000],"methods":"all"}}`},
		{"retry empty", "batch {\n retry\n}", `{"retry":{}}`},
		{"max_inflight", "batch {\n max_inflight 4\n}", `{"max_inflight":4}`},
		{"max_failures", "batch {\n max_failures 50\n}", `{"max_failures":50}`},
		{"max_failure_rate", "batch {\n max_failure_rate 0.05\n}", `{"max_failure_rate":0.05}`},
		{"max_failure_rate sample", "batch {\n max_failure_rate 0.5 20\n}", `{"max_failure_rate":0.5,"failure_rate_sample":20}`},
		{"async window", "batch {\n async {\n  window 2h\n }\n}", `{"async":{"window":7200000000000}}`},
		{"rate", "batch {\n rate 100 1s\n}", `{"rate":{"requests":100,"interval":1000000000}}`},
		{"rate slash", "batch {\n rate 5/1m\n}", `{"rate":{"requests":5,"interval":60000000000}}`},
		{"rate keyed", "batch {\n rate 10 2s {http.request.header.X-Tenant}\n}",
			`{"rate":{"requests":10,"interval":2000000000,"key":"{http.request.header.X-Tenant}"}}`},
		{"rate slash keyed", "batch {\n rate 10/500ms {remote_host}\n}",
			`{"rate":{"requests":10,"interval":500000000,"key":"{remote_host}"}}`},
		{"pacing adaptive", "batch {\n pacing adaptive\n}", `{"pacing":"adaptive"}`},
		{"pacing off", "batch {\n pacing off\n}", `{"pacing":"off"}`},
		{"async bare", "batch {\n async\n}", `{"async":{}}`},
		{"async empty block", "batch {\n async {\n }\n}", `{"async":{}}`},
		{"async", "batch {\n async {\n  retention 1h\n  workers 2\n  owner {http.request.header.X-Api-Key}\n }\n}",
			`{"async":{"retention":3600000000000,"workers":2,"owner":"{http.request.header.X-Api-Key}"}}`},
		{"webhook", "batch {\n async {\n  webhook https://h.example/x {\n   secret \"two words\"\n   events completed error canceled progress\n   progress_interval 30s\n   max_attempts 1\n  }\n }\n}",
			`{"async":{"webhook":{"url":"https://h.example/x","secret":"two words","events":["completed","error","canceled","progress"],"progress_interval":30000000000,"max_attempts":1}}}`},
		{"comments and order", "batch {\n # defaults for the API\n max_ops 5 # five\n mode parallel\n}", `{"mode":"parallel","max_ops":5}`},
		{"quoted values", "batch {\n mode \"parallel\"\n methods `GET` \"POST\"\n}", `{"mode":"parallel","methods":["GET","POST"]}`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var h Handler
			if err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.input)); err != nil {
				t.Fatalf("%q: %v", tc.input, err)
			}
			if got := cfJSON(t, &h); !cfSameJSON(t, got, tc.want) {
				t.Errorf("%q:\ngot  %s\nwant %s", tc.input, got, tc.want)
			}
		})
	}
}

func TestCaddyfileRefused(t *testing.T) {
	t.Parallel()
	block := func(lines ...string) string { return "batch {\n" + strings.Join(lines, "\n") + "\n}" }
	async := func(lines ...string) string { return block(append(append([]string{"async {"}, lines...), "}")...) }
	webhook := func(lines ...string) string {
		return async(append(append([]string{"webhook https://h.example/x {"}, lines...), "}")...)
	}
	bad := map[string]string{
		"argument":                             `batch /x`,
		"two arguments":                        `batch a b`,
		"unknown":                              block("bogus"),
		"unknown cased":                        block("Mode parallel"),
		"camelCase name":                       block("maxOps 5"),
		"skip_operation_logs with an argument": block("skip_operation_logs yes"),

		// Missing values.
		"mode missing":                    block("mode"),
		"atomicity missing":               block("atomicity"),
		"concurrency missing":             block("concurrency"),
		"key_concurrency missing":         block("key_concurrency"),
		"key_concurrency zero":            block("key_concurrency 0"),
		"key_concurrency two arguments":   block("key_concurrency 1 2"),
		"max_ops missing":                 block("max_ops"),
		"max_body_size missing":           block("max_body_size"),
		"max_response_size missing":       block("max_response_size"),
		"timeout missing":                 block("timeout"),
		"op_timeout missing":              block("op_timeout"),
		"methods missing":                 block("methods"),
		"paths missing":                   block("paths"),
		"inherit_headers missing":         block("inherit_headers"),
		"allow_forwarded_headers missing": block("allow_forwarded_headers"),
		"retry_429 missing":               block("retry_429"),
		"retry statuses missing":          block("retry {", "statuses", "}"),
		"retry backoff one":               block("retry {", "backoff 1s", "}"),
		"retry backoff three":             block("retry {", "backoff 1s 2s 3s", "}"),
		"retry backoff cap below":         block("retry {", "backoff 2s 1s", "}"),
		"retry status 200":                block("retry {", "statuses 200", "}"),
		"retry status word":               block("retry {", "statuses busy", "}"),
		"retry max_attempts zero":         block("retry {", "max_attempts 0", "}"),
		"retry max_attempts huge":         block("retry {", "max_attempts 101", "}"),
		"retry methods other":             block("retry {", "methods post", "}"),
		"retry unknown":                   block("retry {", "jitter on", "}"),
		"retry argument":                  block("retry 3"),
		"retry and retry_429":             block("retry_429 2", "retry"),
		"retry_429 and retry":             block("retry", "retry_429 2"),
		"max_inflight missing":            block("max_inflight"),
		"rate missing":                    block("rate"),
		"rate interval missing":           block("rate 10"),
		"rate slash interval missing":     block("rate 10/"),
		"pacing missing":                  block("pacing"),
		"retention missing":               async("retention"),
		"window missing":                  async("window"),
		"max_failures missing":            block("max_failures"),
		"max_failures zero":               block("max_failures 0"),
		"max_failure_rate missing":        block("max_failure_rate"),
		"max_failure_rate zero":           block("max_failure_rate 0"),
		"max_failure_rate percent":        block("max_failure_rate 5%"),
		"max_failure_rate above one":      block("max_failure_rate 5"),
		"max_failure_rate sample zero":    block("max_failure_rate 0.1 0"),
		"max_failure_rate three args":     block("max_failure_rate 0.1 10 20"),
		"workers missing":                 async("workers"),
		"owner missing":                   async("owner"),
		"webhook url missing":             async("webhook"),
		"secret missing":                  webhook("secret"),
		"events missing":                  webhook("events"),
		"progress_interval missing":       webhook("progress_interval"),
		"max_attempts missing":            webhook("max_attempts"),

		// Extra values.
		"mode extra":               block("mode parallel sequential"),
		"atomicity extra":          block("atomicity none stop_on_error"),
		"concurrency extra":        block("concurrency 1 2"),
		"max_ops extra":            block("max_ops 5 6"),
		"size extra":               block("max_body_size 1 MB"),
		"max_response_size extra":  block("max_response_size 1MB 2MB"),
		"timeout extra":            block("timeout 1s 2s"),
		"op_timeout extra":         block("op_timeout 1 s"),
		"retry_429 extra":          block("retry_429 1 2"),
		"max_inflight extra":       block("max_inflight 1 2"),
		"rate extra":               block("rate 1 1s {a} {b}"),
		"rate slash extra":         block("rate 1/1s {a} {b}"),
		"pacing extra":             block("pacing adaptive off"),
		"async argument":           block("async on"),
		"async argument and block": block("async on {", "}"),
		"retention extra":          async("retention 1h 2h"),
		"workers extra":            async("workers 1 2"),
		"owner extra":              async("owner a b"),
		"webhook two urls":         async("webhook https://a https://b"),
		"secret extra":             webhook("secret a b"),
		"max_attempts extra":       webhook("max_attempts 1 2"),

		// Bad numbers.
		"concurrency zero":      block("concurrency 0"),
		"concurrency negative":  block("concurrency -1"),
		"concurrency fraction":  block("concurrency 1.5"),
		"concurrency word":      block("concurrency ten"),
		"concurrency hex":       block("concurrency 0x10"),
		"max_ops zero":          block("max_ops 0"),
		"max_ops huge":          block("max_ops 99999999999999999999"),
		"retry_429 negative":    block("retry_429 -1"),
		"max_inflight zero":     block("max_inflight 0"),
		"max_inflight negative": block("max_inflight -2"),
		"rate zero":             block("rate 0 1s"),
		"rate negative":         block("rate -1 1s"),
		"rate word":             block("rate many 1s"),
		"rate zero interval":    block("rate 5 0s"),
		"rate bad interval":     block("rate 5 soon"),
		"rate slash word":       block("rate 5/soon"),
		"workers zero":          async("workers 0"),
		"max_attempts zero":     webhook("max_attempts 0"),
		"max_attempts negative": webhook("max_attempts -3"),

		// Bad sizes.
		"size zero":      block("max_body_size 0"),
		"size zero MB":   block("max_body_size 0MB"),
		"size negative":  block("max_body_size -1MB"),
		"size unit":      block("max_body_size 1XB"),
		"size no number": block("max_body_size MB"),
		"size word":      block("max_response_size huge"),
		"size too large": block("max_body_size 100EB"),
		"size overflow":  block("max_response_size 99999999999999999999999"),

		// Bad durations.
		"duration zero":          block("timeout 0s"),
		"duration bare zero":     block("timeout 0"),
		"duration negative":      block("timeout -5s"),
		"duration no unit":       block("op_timeout 5"),
		"duration word":          block("op_timeout soon"),
		"duration unit":          block("op_timeout 5x"),
		"retention negative":     async("retention -1h"),
		"retention zero":         async("retention 0s"),
		"progress_interval zero": webhook("progress_interval 0s"),

		// Given twice.
		"mode twice":                    block("mode parallel", "mode parallel"),
		"max_body_size twice":           block("max_body_size 1MB", "max_body_size 2MB"),
		"methods twice":                 block("methods GET", "methods POST"),
		"paths twice":                   block("paths /a", "paths /b"),
		"allow_forwarded_headers twice": block("allow_forwarded_headers Forwarded", "allow_forwarded_headers X-Real-IP"),
		"async twice":                   block("async", "async"),
		"rate twice":                    block("rate 1 1s", "rate 2 1s"),
		"max_inflight twice":            block("max_inflight 1", "max_inflight 2"),
		"retention twice":               async("retention 1h", "retention 2h"),
		"webhook twice":                 async("webhook https://a", "webhook https://b"),
		"secret twice":                  webhook("secret a", "secret b"),
		"events twice":                  webhook("events completed", "events error"),

		// Values that are typos, or can never work.
		"mode typo":          block("mode paralel"),
		"atomicity typo":     block("atomicity all"),
		"forwarded typo":     block("allow_forwarded_headers X-Forwarded-Fro X-Fowarded-Proto"),
		"not forwarded":      block("allow_forwarded_headers Authorization"),
		"path without slash": block("paths users/*"),
		"method with space":  block(`methods "GE T"`),
		"header name":        block("inherit_headers X(Y)"),
		"service_root":       block("service_root v1.0"),
		"literal owner":      async("owner everyone"),
		"pacing typo":        block("pacing adaptative"),
		"literal rate key":   block("rate 5 1s tenant"),
		"webhook no secret":  async("webhook https://h.example/x"),
		"webhook event typo": webhook("secret s", "events complete"),

		// Blocks where none belong, and unknown nested subdirectives.
		"block on mode":            block("mode parallel {", "x", "}"),
		"block on rate":            block("rate 5 1s {", "x", "}"),
		"async unknown":            async("bogus 1"),
		"async batch subdirective": async("mode parallel"),
		"webhook unknown":          webhook("url https://x"),
	}
	for name, input := range bad {
		t.Run(name, func(t *testing.T) {
			var h Handler
			err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(input))
			if err == nil {
				t.Errorf("%q accepted as %s", input, cfJSON(t, &h))
			} else if !strings.Contains(err.Error(), "Testfile:") {
				t.Errorf("%q: error %q does not say where", input, err)
			}
		})
	}
}

// Provision fills in defaults; the JSON config gets the checks the
// Caddyfile parser does not make.
func TestProvisionDefaults(t *testing.T) {
	t.Parallel()
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	var h Handler
	if err := json.Unmarshal([]byte(`{}`), &h); err != nil {
		t.Fatal(err)
	}
	if err := h.Provision(ctx); err != nil {
		t.Fatal(err)
	}
	if err := h.Validate(); err != nil {
		t.Fatal(err)
	}
	want := `{"mode":"sequential","concurrency":10,"key_concurrency":1,"atomicity":"none","max_ops":100,"max_body_size":10485760,
		"max_response_size":10485760,"max_reference_size":10485760,"max_idempotent_size":1048576,"timeout":60000000000,"op_timeout":30000000000,
		"max_inflight":32,"pacing":"off"}`
	if got := cfJSON(t, &h); !cfSameJSON(t, got, want) {
		t.Errorf("defaults:\ngot  %s\nwant %s", got, want)
	}
	if h.rules.mode != "sequential" || h.rules.atomicity != "none" || h.rules.maxOps != 100 ||
		h.rules.pathAllow != nil || len(h.rules.forwarded) != 0 || h.inherit != nil {
		t.Errorf("limits %+v", h.rules)
	}
	var methods []string
	for m := range h.rules.methods {
		methods = append(methods, m)
	}
	if len(methods) != 6 {
		t.Errorf("default methods %q", methods)
	}
	for _, m := range defaultMethods {
		if _, ok := h.rules.methods[m]; !ok {
			t.Errorf("default methods lack %s", m)
		}
	}

	// Configured values are kept, and normalized for lookups.
	h2 := Handler{Methods: []string{"get", "Post", "PURGE"}, AllowForwardedHeaders: []string{"x-forwarded-proto", "X-REAL-IP"},
		InheritHeaders: []string{"authorization", "x-request-id"}, Paths: []string{"/api/*"}, Mode: "parallel", Concurrency: 3, MaxOps: 7}
	if err := h2.Provision(ctx); err != nil {
		t.Fatal(err)
	}
	if err := h2.Validate(); err != nil {
		t.Fatal(err)
	}
	if len(h2.rules.methods) != 3 || h2.rules.maxOps != 7 || h2.rules.mode != "parallel" || h2.Concurrency != 3 {
		t.Errorf("limits %+v", h2.rules)
	}
	for _, m := range []string{"GET", "POST", "PURGE"} {
		if _, ok := h2.rules.methods[m]; !ok {
			t.Errorf("methods lack %s: %v", m, h2.rules.methods)
		}
	}
	for _, name := range []string{"X-Forwarded-Proto", "X-Real-Ip"} {
		if _, ok := h2.rules.forwarded[name]; !ok {
			t.Errorf("forwarded lacks %s: %v", name, h2.rules.forwarded)
		}
	}
	if !reflect.DeepEqual(h2.inherit, []string{"Authorization", "X-Request-Id"}) {
		t.Errorf("inherit %q", h2.inherit)
	}
	if h2.rules.pathAllow == nil {
		t.Error("paths give no pathAllow")
	}
}

func TestProvisionRefusesBadJSONConfig(t *testing.T) {
	t.Parallel()
	bad := map[string]string{
		"mode":                       `{"mode":"fast"}`,
		"mode wrong case":            `{"mode":"Parallel"}`,
		"atomicity":                  `{"atomicity":"all"}`,
		"concurrency negative":       `{"concurrency":-1}`,
		"key_concurrency negative":   `{"key_concurrency":-1}`,
		"max_ops negative":           `{"max_ops":-5}`,
		"max_body_size negative":     `{"max_body_size":-1}`,
		"max_response_size negative": `{"max_response_size":-1}`,
		"timeout negative":           `{"timeout":"-1s"}`,
		"op_timeout negative":        `{"op_timeout":-5}`,
		"retry_429 negative":         `{"retry_429":-1}`,
		"retry with retry_429":       `{"retry":{},"retry_429":2}`,
		"retry max_attempts":         `{"retry":{"max_attempts":1000}}`,
		"retry methods":              `{"retry":{"methods":"post"}}`,
		"retry backoff one":          `{"retry":{"backoff":["1s"]}}`,
		"retry backoff zero":         `{"retry":{"backoff":[0,"1s"]}}`,
		"retry status":               `{"retry":{"statuses":[302]}}`,
		"max_inflight negative":      `{"max_inflight":-1}`,
		"pacing":                     `{"pacing":"fast"}`,
		"rate without requests":      `{"rate":{"interval":"1s"}}`,
		"rate without interval":      `{"rate":{"requests":5}}`,
		"rate negative interval":     `{"rate":{"requests":5,"interval":"-1s"}}`,
		"method with a space":        `{"methods":["GE T"]}`,
		"empty method":               `{"methods":[""]}`,
		"method with a newline":      `{"methods":["GET\n"]}`,
		"forwarded: not forwarded":   `{"allow_forwarded_headers":["Authorization"]}`,
		"forwarded: X-Forwarded":     `{"allow_forwarded_headers":["X-Forwarded"]}`,
		"forwarded: one of many":     `{"allow_forwarded_headers":["X-Forwarded-For","Cookie"]}`,
		"forwarded: Forwarded-For":   `{"allow_forwarded_headers":["Forwarded-For"]}`,
		"async workers negative":     `{"async":{"workers":-1}}`,
		"async retention negative":   `{"async":{"retention":"-1h"}}`,
		"async window negative":      `{"async":{"window":"-1h"}}`,
		"max_failures negative":      `{"max_failures":-1}`,
		"max_failure_rate above one": `{"max_failure_rate":1.5}`,
		"max_failure_rate negative":  `{"max_failure_rate":-0.1}`,
		"rate sample negative":       `{"failure_rate_sample":-1}`,
		"webhook unknown stop event": `{"async":{"webhook":{"url":"https://h.example/x","secret":"s","events":["budget"]}}}`,
		"webhook without url":        `{"async":{"webhook":{"secret":"s"}}}`,
		"webhook without secret":     `{"async":{"webhook":{"url":"https://h.example/x"}}}`,
		"webhook unknown event":      `{"async":{"webhook":{"url":"https://h.example/x","secret":"s","events":["done"]}}}`,
	}
	for name, cfg := range bad {
		t.Run(name, func(t *testing.T) {
			ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
			defer cancel()
			var h Handler
			if err := json.Unmarshal([]byte(cfg), &h); err != nil {
				t.Fatal(err)
			}
			err := h.Provision(ctx)
			if err == nil {
				err = h.Validate()
				_ = h.Cleanup()
			}
			if err == nil {
				t.Errorf("%s accepted", cfg)
			}
		})
	}
	// A negative value is not mistaken for "unset" and defaulted.
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	h := Handler{Concurrency: -1}
	if err := h.Provision(ctx); err != nil {
		t.Fatal(err)
	}
	if h.Concurrency != -1 || h.Validate() == nil {
		t.Errorf("concurrency -1 became %d", h.Concurrency)
	}
}

// The webhook refuses in JSON what its Caddyfile form refuses: a delivery
// that is never given up, and progress sent on every change.
func TestWebhookProvisionRefusesNegatives(t *testing.T) {
	t.Parallel()
	bad := map[string]Webhook{
		"max_attempts negative":      {URL: "https://h.example/x", Secret: "s", MaxAttempts: -1},
		"progress_interval negative": {URL: "https://h.example/x", Secret: "s", ProgressInterval: caddy.Duration(-1)},
	}
	for name, wh := range bad {
		t.Run(name, func(t *testing.T) {
			if err := wh.provision(); err == nil {
				t.Errorf("%+v accepted", wh)
			}
		})
	}
	good := Webhook{URL: "https://h.example/x", Secret: "s"}
	if err := good.provision(); err != nil || good.MaxAttempts < 1 || good.ProgressInterval <= 0 || len(good.Events) == 0 {
		t.Errorf("defaults: %v %+v", err, good)
	}
}

// cfAdapt adapts a Caddyfile site with body and returns every route whose
// handlers include batch, as its matcher sets and the batch handler.
func cfAdapt(t *testing.T, body string) (matches []json.RawMessage, handlers []map[string]any, err error) {
	t.Helper()
	out, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(":8080 {\n"+body+"\n}"), nil)
	if err != nil {
		return nil, nil, err
	}
	var cfg any
	if err := json.Unmarshal(out, &cfg); err != nil {
		t.Fatal(err)
	}
	var walk func(v any)
	walk = func(v any) {
		switch v := v.(type) {
		case map[string]any:
			if hs, ok := v["handle"].([]any); ok {
				for _, h := range hs {
					if hm, ok := h.(map[string]any); ok && hm["handler"] == "batch" {
						m, _ := json.Marshal(v["match"])
						matches = append(matches, m)
						handlers = append(handlers, hm)
					}
				}
			}
			for _, e := range v {
				walk(e)
			}
		case []any:
			for _, e := range v {
				walk(e)
			}
		}
	}
	walk(cfg)
	return matches, handlers, nil
}

func TestAdaptBatchDirective(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name, site, match, handler string
	}{
		{"paths and a block", "batch /batch /batch/* {\n mode parallel\n concurrency 4\n max_ops 5\n max_body_size 1MB\n max_response_size 512KiB\n timeout 30s\n op_timeout 2s\n methods GET POST\n paths /api/*\n allow_forwarded_headers X-Forwarded-Proto\n retry_429 2\n async {\n  workers 2\n }\n}",
			`[{"path":["/batch","/batch/*"]}]`,
			`{"handler":"batch","mode":"parallel","concurrency":4,"max_ops":5,"max_body_size":1000000,"max_response_size":524288,
			  "timeout":30000000000,"op_timeout":2000000000,"methods":["GET","POST"],"paths":["/api/*"],
			  "allow_forwarded_headers":["X-Forwarded-Proto"],"retry_429":2,"async":{"workers":2}}`},
		{"paths, no block", "batch /batch /batch/*", `[{"path":["/batch","/batch/*"]}]`, `{"handler":"batch"}`},
		{"three paths", "batch /a /b /c/*", `[{"path":["/a","/b","/c/*"]}]`, `{"handler":"batch"}`},
		{"one path", "batch /one", `[{"path":["/one"]}]`, `{"handler":"batch"}`},
		{"one path and a block", "batch /one {\n atomicity stop_on_error\n}", `[{"path":["/one"]}]`, `{"handler":"batch","atomicity":"stop_on_error"}`},
		{"named matcher", "@api path /api/batch\nbatch @api", `[{"path":["/api/batch"]}]`, `{"handler":"batch"}`},
		{"named matcher block", "@api {\n path /x\n method POST\n}\nbatch @api {\n max_ops 3\n}", `[{"method":["POST"],"path":["/x"]}]`, `{"handler":"batch","max_ops":3}`},
		{"no matcher", "batch", `null`, `{"handler":"batch"}`},
		{"no matcher, a block", "batch {\n mode parallel\n}", `null`, `{"handler":"batch","mode":"parallel"}`},
		{"wildcard matcher", "batch *", `null`, `{"handler":"batch"}`},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			matches, handlers, err := cfAdapt(t, tc.site)
			if err != nil {
				t.Fatalf("%q: %v", tc.site, err)
			}
			if len(handlers) != 1 {
				t.Fatalf("%q: %d batch handlers", tc.site, len(handlers))
			}
			if !cfSameJSON(t, string(matches[0]), tc.match) {
				t.Errorf("%q: match %s, want %s", tc.site, matches[0], tc.match)
			}
			if got := cfJSON(t, handlers[0]); !cfSameJSON(t, got, tc.handler) {
				t.Errorf("%q:\nhandler %s\nwant    %s", tc.site, got, tc.handler)
			}
		})
	}

	bad := map[string]string{
		"path then not a path":   "batch /a notapath",
		"two named matchers":     "@a path /a\n@b path /b\nbatch @a @b",
		"named then a path":      "@a path /a\nbatch @a /b",
		"path then wildcard":     "batch /a *",
		"undefined matcher":      "batch @nope",
		"unknown subdirective":   "batch /a /b {\n bogus\n}",
		"missing value":          "batch /a {\n mode\n}",
		"argument after a block": "batch {\n mode parallel\n} extra",
	}
	for name, site := range bad {
		t.Run("refused "+name, func(t *testing.T) {
			if _, handlers, err := cfAdapt(t, site); err == nil {
				t.Errorf("%q adapted to %v", site, handlers)
			}
		})
	}
}

// batch is ordered before every other directive, so that each operation
// passes through all of them.
func TestAdaptBatchFirst(t *testing.T) {
	t.Parallel()
	out, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(`:8080 {
	respond /ping "pong"
	rewrite /old /new
	vars x 1
	root * /srv
	basic_auth /private/* {
		u $2a$14$Zkx19XLiW6VYouLHR5NmfOFU0z2GTNmpkT/5qqR7hx4IjWJPDhjvG
	}
	header X-A 1
	reverse_proxy /api/* localhost:9000
	batch /batch /batch/*
}`), nil)
	if err != nil {
		t.Fatal(err)
	}
	var cfg struct {
		Apps struct {
			HTTP struct {
				Servers map[string]struct {
					Routes []struct {
						Handle []map[string]any `json:"handle"`
					} `json:"routes"`
				} `json:"servers"`
			} `json:"http"`
		} `json:"apps"`
	}
	if err := json.Unmarshal(out, &cfg); err != nil {
		t.Fatal(err)
	}
	for _, srv := range cfg.Apps.HTTP.Servers {
		if len(srv.Routes) < 2 || srv.Routes[0].Handle[0]["handler"] != "batch" {
			t.Errorf("batch is not the first route: %s", out)
		}
	}
}

func TestJSONConfig(t *testing.T) {
	be := newBackend(t)
	port := freePort(t)
	cfg := fmt.Sprintf(`{
	"admin": {"disabled": true, "config": {"persist": false}},
	"apps": {"http": {"servers": {"s": {
		"listen": ["127.0.0.1:%d"],
		"routes": [
			{"match": [{"path": ["/batch"]}], "handle": [{"handler": "batch", "mode": "parallel", "concurrency": 4, "max_ops": 2, "op_timeout": "5s", "methods": ["GET"]}]},
			{"handle": [{"handler": "reverse_proxy", "upstreams": [{"dial": %q}]}]}
		]
	}}}}
}`, port, be.addr())
	base := loadCaddy(t, []byte(cfg), port)
	status, _, body := send(t, "POST", base+"/batch", `[{"path":"/health"},{"path":"/users"}]`)
	if status != 200 || mustJSON(t, body).Get("1.body.data").Raw != "[]" {
		t.Errorf("JSON config: %d %s", status, body)
	}
	if status, _, _ := send(t, "POST", base+"/batch", `[{"path":"/health"},{"path":"/health"},{"path":"/health"}]`); status != 413 {
		t.Errorf("max_ops from JSON config: %d", status)
	}
	if status, _, _ := send(t, "POST", base+"/batch", `[{"method":"POST","path":"/users"}]`); status != 400 {
		t.Errorf("methods from JSON config: %d", status)
	}
}

// caddy adapt refuses each typo of a batch block and names its file and
// line, instead of failing at run time with none.
func TestAdaptTyposWithLines(t *testing.T) {
	t.Parallel()
	for line, c := range map[string]struct{ lines, want string }{
		"4":  {"\tmax_ops 5\n\tmode paralel", `mode must be sequential or parallel, got "paralel"`},
		"3":  {"\tatomicity all", `atomicity must be none or stop_on_error or all_or_nothing`},
		"5":  {"\tmax_ops 5\n\ttimeout 1s\n\tallow_forwarded_headers X-Fowarded-For", `"X-Fowarded-For" is not an X-Forwarded-*`},
		"6":  {"\n\n\tasync {\n\t\twebhook https://h.example/x {\n\t\t\tevents completed\n\t\t}\n\t}", "needs a secret"},
		"7":  {"\n\n\n\n\tpaths users/*", `"users/*" never matches`},
		"8":  {"\tmax_ops 5\n\n\n\n\n\tpacing adptive", `pacing must be adaptive or off, got "adptive"`},
		"9":  {"\n\n\n\n\n\n\trate 5 1s tenant", `rate key "tenant" is the same for every request`},
		"10": {"\n\n\n\n\n\n\n\tmax_inflight 0", `expected a whole number of at least 1, got "0"`},
		"11": {"\n\n\n\n\n\n\n\n\trate ten/1s", `rate: expected a whole number of at least 1, got "ten"`},
	} {
		cfg := "example.com {\n\tbatch /batch {\n" + c.lines + "\n\t}\n}\n"
		_, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(cfg), map[string]any{"filename": "Caddyfile"})
		if err == nil || !strings.Contains(err.Error(), c.want) || !strings.Contains(err.Error(), "Caddyfile:"+line) {
			t.Errorf("line %s: %v\n%s", line, err, cfg)
		}
	}
}
