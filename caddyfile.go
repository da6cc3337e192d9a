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
//		timeout           <duration>
//		op_timeout        <duration>
//		methods           <method...>
//		paths             <pattern...>
//		inherit_headers   <name...>
//		allow_forwarded_headers <name...>
//		retry_429         <n>
//		async {
//			retention <duration>
//			workers   <n>
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
	seen := map[string]bool{}
	for d.NextBlock(0) {
		name := d.Val()
		if seen[name] {
			return d.Errf("%s already specified", name)
		}
		seen[name] = true
		var err error
		switch name {
		case "mode":
			err = oneArg(d, &h.Mode)
		case "atomicity":
			err = oneArg(d, &h.Atomicity)
		case "concurrency":
			err = intArg(d, &h.Concurrency)
		case "max_ops":
			err = intArg(d, &h.MaxOps)
		case "max_body_size":
			err = sizeArg(d, &h.MaxBodySize)
		case "max_response_size":
			err = sizeArg(d, &h.MaxResponseSize)
		case "timeout":
			err = durationArg(d, &h.Timeout)
		case "op_timeout":
			err = durationArg(d, &h.OpTimeout)
		case "methods":
			err = listArg(d, &h.Methods)
		case "paths":
			err = listArg(d, &h.Paths)
		case "inherit_headers":
			err = listArg(d, &h.InheritHeaders)
		case "allow_forwarded_headers":
			err = listArg(d, &h.AllowForwardedHeaders)
		case "retry_429":
			err = intArg(d, &h.Retry429)
		case "async":
			h.Async = new(AsyncConfig)
			err = h.Async.unmarshalCaddyfile(d)
		default:
			return d.Errf("unrecognized subdirective '%s'", name)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

func (a *AsyncConfig) unmarshalCaddyfile(d *caddyfile.Dispenser) error {
	if d.NextArg() {
		return d.ArgErr()
	}
	seen := map[string]bool{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		name := d.Val()
		if seen[name] {
			return d.Errf("async: %s already specified", name)
		}
		seen[name] = true
		var err error
		switch name {
		case "retention":
			err = durationArg(d, &a.Retention)
		case "workers":
			err = intArg(d, &a.Workers)
		case "owner":
			err = oneArg(d, &a.Owner)
		case "webhook":
			a.Webhook = new(Webhook)
			err = a.Webhook.unmarshalCaddyfile(d)
		default:
			return d.Errf("unrecognized async subdirective '%s'", name)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

func (wh *Webhook) unmarshalCaddyfile(d *caddyfile.Dispenser) error {
	if !d.NextArg() {
		return d.ArgErr()
	}
	wh.URL = d.Val()
	if d.NextArg() {
		return d.ArgErr()
	}
	seen := map[string]bool{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		name := d.Val()
		if seen[name] {
			return d.Errf("webhook: %s already specified", name)
		}
		seen[name] = true
		var err error
		switch name {
		case "secret":
			err = oneArg(d, &wh.Secret)
		case "events":
			err = listArg(d, &wh.Events)
		case "progress_interval":
			err = durationArg(d, &wh.ProgressInterval)
		case "max_attempts":
			err = intArg(d, &wh.MaxAttempts)
		default:
			return d.Errf("unrecognized webhook subdirective '%s'", name)
		}
		if err != nil {
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

func intArg(d *caddyfile.Dispenser, dst *int) error {
	var s string
	if !d.AllArgs(&s) {
		return d.ArgErr()
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 {
		return d.Errf("expected a positive whole number, got %q", s)
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
