package batch

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/http"
	"strings"

	"github.com/caddyserver/caddy/v2"
)

// ownerHash identifies who may see a job or replay an idempotent answer: a
// hash of the owner placeholder evaluated on r, so that storage never holds
// credentials. ok is false when the value is empty: every anonymous caller
// would share that owner, so nothing is stored or read under it.
func (h *Handler) ownerHash(r *http.Request) (hash string, ok bool) {
	repl, _ := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
	v := ""
	if repl != nil {
		v = repl.ReplaceAll(h.owner, "")
	}
	if strings.TrimSpace(v) == "" {
		return "", false
	}
	sum := sha256.Sum256([]byte("caddy-batch owner\x00" + v))
	return hex.EncodeToString(sum[:]), true
}

// refuseNoOwner refuses, in format f, a request whose owner value is empty.
func (h *Handler) refuseNoOwner(w http.ResponseWriter, f format) error {
	return f.refuse(w, http.StatusUnauthorized, fmt.Sprintf("async batches and Idempotency-Key need an owner, "+
		"and %s is empty for this request: send the credentials it reads, or set the async block's owner "+
		"to a placeholder known when batch runs (authentication in a route before batch, "+
		"or {http.request.cookie.NAME} for cookie sessions)", h.owner), nil)
}
