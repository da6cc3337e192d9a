package lagstore

import (
	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

func init() {
	httpcaddyfile.RegisterHandlerDirective("batch_storage_calls", parseCalls)
	// Where a handler that answers on its own goes; on its own path, the
	// order hardly matters.
	httpcaddyfile.RegisterDirectiveOrder("batch_storage_calls", httpcaddyfile.Before, "respond")
}

// UnmarshalCaddyfile sets up the storage from Caddyfile tokens (the global
// option storage batch_lag). Syntax:
//
//	storage batch_lag [<root>] {
//		root    <dir>
//		latency <duration>
//		jitter  <duration>
//	}
func (s *Storage) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume the module name
	if d.NextArg() {
		s.Root = d.Val()
	}
	if d.NextArg() {
		return d.ArgErr()
	}
	for d.NextBlock(0) {
		switch d.Val() {
		case "root":
			if s.Root != "" {
				return d.Err("root already set")
			}
			if !d.AllArgs(&s.Root) {
				return d.ArgErr()
			}
		case "latency", "jitter":
			name := d.Val()
			var v string
			if !d.AllArgs(&v) {
				return d.ArgErr()
			}
			dur, err := caddy.ParseDuration(v)
			if err != nil {
				return d.Errf("%s: %v", name, err)
			}
			if dur < 0 {
				return d.Errf("%s must not be negative", name)
			}
			if name == "latency" {
				s.Latency = caddy.Duration(dur)
			} else {
				s.Jitter = caddy.Duration(dur)
			}
		default:
			return d.Errf("unrecognized subdirective '%s'", d.Val())
		}
	}
	if s.Root == "" {
		return d.Err("batch_lag needs a root directory")
	}
	return nil
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	batch_storage_calls [<matcher>]
func (h *CallsHandler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // consume the directive name
	if d.NextArg() || d.NextBlock(0) {
		return d.ArgErr()
	}
	return nil
}

func parseCalls(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	c := new(CallsHandler)
	err := c.UnmarshalCaddyfile(h.Dispenser)
	return c, err
}

// Interface guards
var (
	_ caddyfile.Unmarshaler = (*Storage)(nil)
	_ caddyfile.Unmarshaler = (*CallsHandler)(nil)
)
