package lagstore

import (
	"encoding/json"
	"net/http"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

func init() { caddy.RegisterModule(CallsHandler{}) }

// CallsHandler is http.handlers.batch_storage_calls: it answers the calls
// this process's batch_lag storages have received so far, by method, as
// JSON: {"store":n,"load":n,…,"unlock":n,"total":n}. It never calls the
// next handler.
type CallsHandler struct{}

// CaddyModule returns the Caddy module information.
func (CallsHandler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{ID: "http.handlers.batch_storage_calls", New: func() caddy.Module { return new(CallsHandler) }}
}

// ServeHTTP answers the counts.
func (CallsHandler) ServeHTTP(w http.ResponseWriter, _ *http.Request, _ caddyhttp.Handler) error {
	c := Calls()
	body, err := json.Marshal(struct {
		Counts
		Total int64 `json:"total"`
	}{c, c.Total()})
	if err != nil {
		return err
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	_, err = w.Write(body)
	return err
}

// Interface guard
var _ caddyhttp.MiddlewareHandler = (*CallsHandler)(nil)
