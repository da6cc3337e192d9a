package batch

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"net/http"
	"strconv"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// A job resumed on an instance that has not served its endpoint since it
// started runs through the handler found at the same place in the config
// (server, route and handler, down through subroutes) with the same
// config, and the chain that follows it there: what a request would have
// brought it.

// self finds the handler in the HTTP app's routes: the server it serves in
// and the chain after it. It is found once its config runs, and names the
// handler's identity.
func (h *Handler) self() (ep endpoint, identity string, ok bool) {
	h.selfMu.Lock()
	defer h.selfMu.Unlock()
	if h.selfEP.h != nil {
		return h.selfEP, h.identity, true
	}
	// The running config's app: this handler's once its config has
	// started, and not provisioning any more.
	app, err := caddy.ActiveContext().AppIfConfigured("http")
	if err != nil {
		return endpoint{}, "", false
	}
	httpApp, ok := app.(*caddyhttp.App)
	if !ok {
		return endpoint{}, "", false
	}
	for name, srv := range httpApp.Servers {
		pos, next, found := findHandler(srv.Routes, h, caddyhttp.HandlerFunc(func(http.ResponseWriter, *http.Request) error { return nil }), "")
		if !found {
			continue
		}
		cfg, _ := json.Marshal(h)
		sum := sha256.Sum256([]byte(name + "\x00" + pos + "\x00" + string(cfg)))
		h.identity = hex.EncodeToString(sum[:12])
		h.selfEP = endpoint{h: h, next: next, srv: srv}
		if g := time.Duration(httpApp.GracePeriod); g > 0 {
			h.pool.setGrace(g)
		}
		return h.selfEP, h.identity, true
	}
	return endpoint{}, "", false
}

// findHandler looks for h in routes, whose chain goes on to after; it
// returns where h is and the chain after it, as a request reaching h
// would have it as next.
func findHandler(routes caddyhttp.RouteList, h *Handler, after caddyhttp.Handler, pos string) (string, caddyhttp.Handler, bool) {
	for i, route := range routes {
		rest := func() caddyhttp.Handler {
			if route.Terminal {
				return caddyhttp.HandlerFunc(func(http.ResponseWriter, *http.Request) error { return nil })
			}
			return routes[i+1:].Compile(after)
		}
		for k, mh := range route.Handlers {
			here := pos + "/" + strconv.Itoa(i) + "." + strconv.Itoa(k)
			switch v := mh.(type) {
			case *Handler:
				if v == h {
					return here, chain(route.Handlers[k+1:], rest()), true
				}
			case *caddyhttp.Subroute:
				if p, next, ok := findHandler(v.Routes, h, chain(route.Handlers[k+1:], rest()), here); ok {
					return p, next, true
				}
			}
		}
	}
	return "", nil, false
}

// chain returns the handlers, then next.
func chain(handlers []caddyhttp.MiddlewareHandler, next caddyhttp.Handler) caddyhttp.Handler {
	for i := len(handlers) - 1; i >= 0; i-- {
		mh, n := handlers[i], next
		next = caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error { return mh.ServeHTTP(w, r, n) })
	}
	return next
}
