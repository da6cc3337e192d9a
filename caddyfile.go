package batch

import (
	"net/http"
	"slices"
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/dustin/go-humanize"
	"golang.org/x/net/http/httpguts"
)

func init() {
	httpcaddyfile.RegisterDirective("batch", parseDirective)
	// First of all directives, so that each sub-request passes through every
	// other one (vars, root, rewrites, auth, proxying) as a lone request does.
	httpcaddyfile.RegisterDirectiveOrder("batch", httpcaddyfile.Before, "tracing")
}

// parseDirective is RegisterHandlerDirective's parser, but for one more
// form of matcher: several paths, as in "batch /batch /batch/*", which
// covers the batch path and its job paths but not "/batchfoo".
func parseDirective(h httpcaddyfile.Helper) ([]httpcaddyfile.ConfigValue, error) {
	h.Next() // consume directive name
	var paths []string
	for h.NextArg() {
		paths = append(paths, h.Val())
	}
	h.Reset()

	var matcherSet caddy.ModuleMap
	if len(paths) > 1 {
		for _, p := range paths {
			if !strings.HasPrefix(p, "/") {
				return nil, h.Errf("batch takes one matcher, or several paths; %q is not a path", p)
			}
		}
		matcherSet = caddy.ModuleMap{"path": caddyconfig.JSON(caddyhttp.MatchPath(paths), nil)}
		h.Next()
		for range paths {
			h.NextArg()
			h.Delete()
		}
		h.Reset()
	} else {
		var err error
		h.Next()
		if matcherSet, err = h.ExtractMatcherSet(); err != nil {
			return nil, err
		}
	}
	b := new(Handler)
	if err := b.UnmarshalCaddyfile(h.Dispenser); err != nil {
		return nil, err
	}
	return h.NewRoute(matcherSet, b), nil
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	batch [<matcher> | <path...>] {
//		mode              sequential|parallel
//		concurrency       <n>
//		key_concurrency   <n>
//		atomicity         none|stop_on_error|all_or_nothing
//		max_ops           <n>
//		max_body_size     <size>
//		max_response_size <size>
//		max_reference_size <size>
//		max_idempotent_size <size>
//		timeout           <duration>
//		op_timeout        <duration>
//		methods           <method...>
//		paths             <pattern...>
//		inherit_headers   <name...>
//		allow_forwarded_headers <name...>
//		retry {
//			statuses     <status...>
//			max_attempts <n>
//			backoff      <first> <cap>
//			methods      idempotent|all
//		}
//		retry_429         <n>
//		max_failures      <n>
//		max_failure_rate  <fraction> [<min sample>]
//		max_inflight      <n>
//		rate              <n> <interval>|<n>/<interval> [<key placeholder>]
//		pacing            adaptive|off
//		service_root      <path>
//		encode            <encoding...>|off
//		skip_operation_logs
//		async {
//			retention <duration>
//			window    <duration>
//			workers   <n>
//			max_queued <n>
//			owner     <placeholder>
//			max_ops   <n>
//			max_body_size <size>
//			lease     <duration>
//			credentials_key <key> [<old key>...]
//			op_idempotency_header <name>|off
//			webhook   <url> {
//				secret            <string>
//				events            completed|error|canceled|stopped|expired|progress...
//				progress_interval <duration>
//				max_attempts      <n>
//			}
//		}
//	}
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume directive name
	if d.NextArg() {
		return d.ArgErr()
	}
	return eachSubdirective(d, "batch", func(name string) error {
		switch name {
		case "mode":
			return choiceArg(d, name, &h.Mode, modeSequential, modeParallel)
		case "atomicity":
			return choiceArg(d, name, &h.Atomicity, atomicNone, atomicStopOnError, atomicAllOrNothing)
		case "concurrency":
			return intArg(d, &h.Concurrency, 1)
		case "key_concurrency":
			return intArg(d, &h.KeyConcurrency, 1)
		case "max_ops":
			return intArg(d, &h.MaxOps, 1)
		case "max_body_size":
			return sizeArg(d, &h.MaxBodySize)
		case "max_response_size":
			return sizeArg(d, &h.MaxResponseSize)
		case "max_reference_size":
			return sizeArg(d, &h.MaxReferenceSize)
		case "max_idempotent_size":
			return sizeArg(d, &h.MaxIdempotentSize)
		case "timeout":
			return durationArg(d, &h.Timeout)
		case "op_timeout":
			return durationArg(d, &h.OpTimeout)
		case "methods":
			return checkedListArg(d, &h.Methods, func(m string) string {
				if !httpguts.ValidHeaderFieldName(m) {
					return "is not an HTTP method"
				}
				return ""
			})
		case "paths":
			// A path matcher pattern that starts with neither '/' nor '*'
			// matches no request path: every operation would be refused.
			return checkedListArg(d, &h.Paths, func(p string) string {
				if !strings.HasPrefix(p, "/") && !strings.HasPrefix(p, "*") {
					return "never matches: operation paths start with '/'"
				}
				return ""
			})
		case "inherit_headers":
			return checkedListArg(d, &h.InheritHeaders, func(name string) string {
				if !httpguts.ValidHeaderFieldName(name) {
					return "is not a header name"
				}
				return ""
			})
		case "allow_forwarded_headers":
			return checkedListArg(d, &h.AllowForwardedHeaders, func(name string) string {
				if !isForwardedHeader(http.CanonicalHeaderKey(name)) {
					return "is not an X-Forwarded-*, Forwarded or X-Real-IP header"
				}
				return ""
			})
		case "skip_operation_logs":
			if d.NextArg() {
				return d.ArgErr()
			}
			h.SkipOperationLogs = true
			return nil
		case "log_operations": // the older name: "log_operations off"
			var v string
			if err := choiceArg(d, name, &v, "on", "off"); err != nil {
				return err
			}
			h.SkipOperationLogs = v == "off"
			return nil
		case "encode":
			return checkedListArg(d, &h.Encode, func(e string) string {
				if e == "off" && len(h.Encode) > 1 {
					return "stands alone"
				}
				return ""
			})
		case "service_root":
			if err := oneArg(d, &h.ServiceRoot); err != nil {
				return err
			}
			if !strings.HasPrefix(h.ServiceRoot, "/") {
				return d.Errf("service_root %q must be a path that starts with '/'", h.ServiceRoot)
			}
			return nil
		case "retry":
			if h.Retry429 != 0 {
				return d.Err("retry_429 is an alias of retry: give one of them")
			}
			h.Retry = new(RetryConfig)
			return h.Retry.unmarshalCaddyfile(d)
		case "retry_429":
			if h.Retry != nil {
				return d.Err("retry_429 is an alias of retry: give one of them")
			}
			return intArg(d, &h.Retry429, 0)
		case "max_failures":
			return intArg(d, &h.MaxFailures, 1)
		case "max_failure_rate":
			return h.failureRateArgs(d)
		case "max_inflight":
			return intArg(d, &h.MaxInflight, 1)
		case "rate":
			h.Rate = new(RateConfig)
			return h.Rate.unmarshalCaddyfile(d)
		case "pacing":
			return choiceArg(d, name, &h.Pacing, pacingAdaptive, pacingOff)
		case "async":
			h.Async = new(AsyncConfig)
			return h.Async.unmarshalCaddyfile(d)
		}
		return d.Errf("unrecognized subdirective '%s'", name)
	})
}

// failureRateArgs reads "max_failure_rate <fraction> [<min sample>]".
func (h *Handler) failureRateArgs(d *caddyfile.Dispenser) error {
	args := d.RemainingArgs()
	if len(args) < 1 || len(args) > 2 {
		return d.Errf("max_failure_rate takes <fraction> [<min sample>], got %d arguments", len(args))
	}
	f, err := strconv.ParseFloat(args[0], 64)
	if err != nil || !(f > 0 && f <= 1) {
		return d.Errf("max_failure_rate: expected a fraction above 0 and at most 1 (0.05 for 5%%), got %q", args[0])
	}
	h.MaxFailureRate = f
	if len(args) == 2 {
		n, err := strconv.Atoi(args[1])
		if err != nil || n < 1 {
			return d.Errf("max_failure_rate: expected a sample of at least 1 operation, got %q", args[1])
		}
		h.FailureRateSample = n
	}
	return nil
}

// unmarshalCaddyfile reads "rate <n> <interval> [<key>]", or the same
// with "<n>/<interval>".
func (rc *RateConfig) unmarshalCaddyfile(d *caddyfile.Dispenser) error {
	args := d.RemainingArgs()
	if len(args) > 0 {
		if n, per, ok := strings.Cut(args[0], "/"); ok {
			args = append([]string{n, per}, args[1:]...)
		}
	}
	if len(args) < 2 || len(args) > 3 {
		return d.Errf("rate takes <n> <interval> [<key placeholder>], got %d arguments", len(args))
	}
	n, err := strconv.Atoi(args[0])
	if err != nil || n < 1 {
		return d.Errf("rate: expected a whole number of at least 1, got %q", args[0])
	}
	dur, err := caddy.ParseDuration(args[1])
	if err != nil || dur <= 0 {
		return d.Errf("rate: invalid interval %q: must be positive", args[1])
	}
	rc.Requests, rc.Interval = n, caddy.Duration(dur)
	if len(args) == 3 {
		rc.Key = args[2]
		if !strings.Contains(rc.Key, "{") {
			return d.Errf("rate key %q is the same for every request: give a placeholder, such as {http.request.header.X-Tenant}", rc.Key)
		}
	}
	if d.NextBlock(d.Nesting()) {
		return d.Errf("rate takes no block")
	}
	return nil
}

// unmarshalCaddyfile reads the retry block.
func (rc *RetryConfig) unmarshalCaddyfile(d *caddyfile.Dispenser) error {
	if d.NextArg() {
		return d.ArgErr()
	}
	return eachSubdirective(d, "retry", func(name string) error {
		switch name {
		case "statuses":
			args := d.RemainingArgs()
			if len(args) == 0 {
				return d.ArgErr()
			}
			for _, a := range args {
				n, err := strconv.Atoi(a)
				if err != nil || n < 400 || n > 599 {
					return d.Errf("retry: statuses must be 400 to 599, got %q", a)
				}
				rc.Statuses = append(rc.Statuses, n)
			}
			return nil
		case "max_attempts":
			if err := intArg(d, &rc.MaxAttempts, 1); err != nil {
				return err
			}
			if rc.MaxAttempts > maxConfigAttempts {
				return d.Errf("retry: max_attempts must be at most %d, got %d", maxConfigAttempts, rc.MaxAttempts)
			}
			return nil
		case "backoff":
			args := d.RemainingArgs()
			if len(args) != 2 {
				return d.Errf("retry: backoff takes <first> <cap>, got %d arguments", len(args))
			}
			for _, a := range args {
				dur, err := caddy.ParseDuration(a)
				if err != nil || dur <= 0 {
					return d.Errf("retry: invalid duration %q: must be positive", a)
				}
				rc.Backoff = append(rc.Backoff, caddy.Duration(dur))
			}
			if rc.Backoff[1] < rc.Backoff[0] {
				return d.Errf("retry: the backoff cap %s is below its first wait %s", args[1], args[0])
			}
			return nil
		case "methods":
			return choiceArg(d, "retry: methods", &rc.Methods, retryMethodsIdem, retryMethodsAll)
		}
		return d.Errf("unrecognized retry subdirective '%s'", name)
	})
}

func (a *AsyncConfig) unmarshalCaddyfile(d *caddyfile.Dispenser) error {
	if d.NextArg() {
		return d.ArgErr()
	}
	return eachSubdirective(d, "async", func(name string) error {
		switch name {
		case "retention":
			return durationArg(d, &a.Retention)
		case "window":
			return durationArg(d, &a.Window)
		case "workers":
			return intArg(d, &a.Workers, 1)
		case "max_queued":
			return intArg(d, &a.MaxQueued, 1)
		case "owner":
			if err := oneArg(d, &a.Owner); err != nil {
				return err
			}
			if !strings.Contains(a.Owner, "{") {
				return d.Errf("owner %q is the same for every request: give a placeholder, such as {http.request.header.X-Api-Key}", a.Owner)
			}
			return nil
		case "max_ops":
			return intArg(d, &a.MaxOps, 1)
		case "max_body_size":
			return sizeArg(d, &a.MaxBodySize)
		case "lease":
			return durationArg(d, &a.Lease)
		case "credentials_key":
			keys := d.RemainingArgs()
			if len(keys) == 0 {
				return d.ArgErr()
			}
			a.CredentialsKey, a.OldCredentialsKeys = keys[0], keys[1:]
			return nil
		case "op_idempotency_header":
			if err := oneArg(d, &a.OpIdempotencyHeader); err != nil {
				return err
			}
			if a.OpIdempotencyHeader != "off" && !httpguts.ValidHeaderFieldName(a.OpIdempotencyHeader) {
				return d.Errf("op_idempotency_header %q is not a header name, nor off", a.OpIdempotencyHeader)
			}
			return nil
		case "webhook":
			a.Webhook = new(Webhook)
			return a.Webhook.unmarshalCaddyfile(d)
		}
		return d.Errf("unrecognized async subdirective '%s'", name)
	})
}

func (wh *Webhook) unmarshalCaddyfile(d *caddyfile.Dispenser) error {
	if !d.NextArg() {
		return d.ArgErr()
	}
	wh.URL = d.Val()
	if d.NextArg() {
		return d.ArgErr()
	}
	noSecret := d.Errf("webhook %s needs a secret: receivers must be able to verify deliveries", wh.URL)
	err := eachSubdirective(d, "webhook", func(name string) error {
		switch name {
		case "secret":
			return oneArg(d, &wh.Secret)
		case "events":
			return checkedListArg(d, &wh.Events, func(e string) string {
				if !slices.Contains(webhookEvents, e) {
					return "is not an event: completed, error, canceled, stopped, expired or progress"
				}
				return ""
			})
		case "progress_interval":
			return durationArg(d, &wh.ProgressInterval)
		case "max_attempts":
			return intArg(d, &wh.MaxAttempts, 1)
		}
		return d.Errf("unrecognized webhook subdirective '%s'", name)
	})
	if err == nil && wh.Secret == "" {
		return noSecret
	}
	return err
}

// eachSubdirective calls fn for each subdirective of the block at d,
// refusing one given twice; what names the block in errors.
func eachSubdirective(d *caddyfile.Dispenser, what string, fn func(name string) error) error {
	seen := map[string]bool{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		name := d.Val()
		if seen[name] {
			return d.Errf("%s: %s already specified", what, name)
		}
		seen[name] = true
		if err := fn(name); err != nil {
			return err
		}
	}
	return nil
}

func oneArg(d *caddyfile.Dispenser, dst *string) error {
	if !d.AllArgs(dst) {
		return d.ArgErr()
	}
	return nil
}

func intArg(d *caddyfile.Dispenser, dst *int, least int) error {
	var s string
	if !d.AllArgs(&s) {
		return d.ArgErr()
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < least {
		return d.Errf("expected a whole number of at least %d, got %q", least, s)
	}
	*dst = n
	return nil
}

func sizeArg(d *caddyfile.Dispenser, dst *int64) error {
	var s string
	if !d.AllArgs(&s) {
		return d.ArgErr()
	}
	n, err := humanize.ParseBytes(s)
	if err != nil || n == 0 || n > 1<<62 {
		return d.Errf("invalid size %q: %v", s, err)
	}
	*dst = int64(n)
	return nil
}

func durationArg(d *caddyfile.Dispenser, dst *caddy.Duration) error {
	var s string
	if !d.AllArgs(&s) {
		return d.ArgErr()
	}
	dur, err := caddy.ParseDuration(s)
	if err != nil || dur <= 0 {
		return d.Errf("invalid duration %q: must be positive", s)
	}
	*dst = caddy.Duration(dur)
	return nil
}

// choiceArg reads one argument that must be one of choices.
func choiceArg(d *caddyfile.Dispenser, name string, dst *string, choices ...string) error {
	if err := oneArg(d, dst); err != nil {
		return err
	}
	if !slices.Contains(choices, *dst) {
		return d.Errf("%s must be %s, got %q", name, strings.Join(choices, " or "), *dst)
	}
	return nil
}

// checkedListArg reads a list whose every value bad finds nothing wrong
// with.
func checkedListArg(d *caddyfile.Dispenser, dst *[]string, bad func(string) string) error {
	if err := listArg(d, dst); err != nil {
		return err
	}
	for _, v := range *dst {
		if msg := bad(v); msg != "" {
			return d.Errf("%q %s", v, msg)
		}
	}
	return nil
}

func listArg(d *caddyfile.Dispenser, dst *[]string) error {
	args := d.RemainingArgs()
	if len(args) == 0 {
		return d.ArgErr()
	}
	*dst = args
	return nil
}

// Interface guard
var _ caddyfile.Unmarshaler = (*Handler)(nil)
