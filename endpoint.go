package batch

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// A job resumed on an instance that has not served its endpoint since it
// started runs through the handler found at the same place in the config
// (server, route and handler, down through subroutes) with the same
// config, and the chain that follows it there: what a request would have
// brought it.

// endpoint is a handler serving async batches, and what it serves them
// with.
type endpoint struct {
	h    *Handler
	next caddyhttp.Handler
	srv  *caddyhttp.Server
}

// endpointKey names where r, a request for batches at batchPath, is
// served: server, host and path stay the same across config reloads.
func endpointKey(srv *caddyhttp.Server, r *http.Request, batchPath string) string {
	host, _, err := net.SplitHostPort(r.Host)
	if err != nil {
		host = r.Host
	}
	return srv.Name() + "\x00" + strings.ToLower(host) + "\x00" + batchPath
}

// serveAt records that ep serves at key, as of now.
// A full map drops the endpoints of configs that have been unloaded; if
// still full, a new one is not kept: a job submitted there then runs
// through the handler at its place in the running config (servesJob).
func (p *jobPool) serveAt(key string, ep endpoint) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.endpoints == nil {
		p.endpoints = map[string]endpoint{}
	}
	if _, ok := p.endpoints[key]; !ok && len(p.endpoints) >= maxEndpoints {
		for k, e := range p.endpoints {
			if e.h.ctx.Err() != nil {
				delete(p.endpoints, k)
			}
		}
		if len(p.endpoints) >= maxEndpoints {
			return
		}
	}
	if p.endpoints[key].h != ep.h {
		p.endpointsGen++
	}
	p.endpoints[key] = ep
}

// endpointsGeneration counts the changes of the endpoints served: which
// handler a stored job runs through may change with it.
func (p *jobPool) endpointsGeneration() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.endpointsGen
}

// maxEndpoints bounds the places jobs were submitted at that the pool
// keeps (a Host and a path are the client's to choose); a variable, so
// that tests may lower it.
var maxEndpoints = 1000

func (p *jobPool) endpointAt(key string) (endpoint, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	ep, ok := p.endpoints[key]
	return ep, ok
}

// self finds the handler in the HTTP app's routes: the server it serves in
// and the chain after it. It is found once its config runs, and names the
// handler's identity.
func (a *asyncJobs) self() (ep endpoint, identity string, ok bool) {
	a.selfMu.Lock()
	defer a.selfMu.Unlock()
	if a.selfEP.h != nil {
		return a.selfEP, a.identity, true
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
		pos, next, found := findHandler(srv.Routes, a.h, caddyhttp.HandlerFunc(func(http.ResponseWriter, *http.Request) error { return nil }), "")
		if !found {
			continue
		}
		cfg, _ := json.Marshal(a.h)
		sum := sha256.Sum256([]byte(name + "\x00" + pos + "\x00" + string(cfg)))
		a.identity = hex.EncodeToString(sum[:12])
		a.selfEP = endpoint{h: a.h, next: next, srv: srv}
		if g := time.Duration(httpApp.GracePeriod); g > 0 {
			a.pool.setGrace(g)
		}
		return a.selfEP, a.identity, true
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
