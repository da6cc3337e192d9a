package batch

import (
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/dustin/go-humanize"
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
//		retry_429         <n>
//		service_root      <path>
//		async {
//			retention <duration>
//			workers   <n>
//			max_queued <n>
//			owner     <placeholder>
//			webhook   <url> {
//				secret            <string>
//				events            completed|error|canceled|progress...
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
			return oneArg(d, &h.Mode)
		case "atomicity":
			return oneArg(d, &h.Atomicity)
		case "concurrency":
			return intArg(d, &h.Concurrency, 1)
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
			return listArg(d, &h.Methods)
		case "paths":
			return listArg(d, &h.Paths)
		case "inherit_headers":
			return listArg(d, &h.InheritHeaders)
		case "allow_forwarded_headers":
			return listArg(d, &h.AllowForwardedHeaders)
		case "service_root":
			return oneArg(d, &h.ServiceRoot)
		case "retry_429":
			return intArg(d, &h.Retry429, 0)
		case "async":
			h.Async = new(AsyncConfig)
			return h.Async.unmarshalCaddyfile(d)
		}
		return d.Errf("unrecognized subdirective '%s'", name)
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
		case "workers":
			return intArg(d, &a.Workers, 1)
		case "max_queued":
			return intArg(d, &a.MaxQueued, 1)
		case "owner":
			return oneArg(d, &a.Owner)
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
	return eachSubdirective(d, "webhook", func(name string) error {
		switch name {
		case "secret":
			return oneArg(d, &wh.Secret)
		case "events":
			return listArg(d, &wh.Events)
		case "progress_interval":
			return durationArg(d, &wh.ProgressInterval)
		case "max_attempts":
			return intArg(d, &wh.MaxAttempts, 1)
		}
		return d.Errf("unrecognized webhook subdirective '%s'", name)
	})
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
