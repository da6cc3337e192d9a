package batch

import (
	"context"
	"crypto/pbkdf2"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"strings"
	"sync"

	"github.com/caddyserver/caddy/v2"
)

// Who may see a job or replay an idempotent answer is the value of the
// owner placeholder on the request (its Authorization header by default).
// Storage never holds that value, nor a fast hash of it, which a
// dictionary reverses at once: it holds PBKDF2-HMAC-SHA256 of it, salted
// with a secret every instance sharing the storage reads from there.
// Values this process has hashed are remembered, so that a caller pays
// the cost once.

// ownerIterations makes one guess at an owner cost about a millisecond.
const ownerIterations = 8192

// ownerHashPrefix marks the hashes of this scheme; a job stored with an
// older, unsalted one still answers to its owner until it expires.
const ownerHashPrefix = "v2:"

const ownerSaltKey = "batch/owner_salt"

// maxOwnerCache bounds the hashes remembered; past it, the cache starts
// anew.
const maxOwnerCache = 10000

// owners hashes the owner placeholder's value.
type owners struct {
	placeholder string
	store       *store // nil in a handler provisioned without a config

	mu    sync.Mutex
	salt  []byte
	cache map[[sha256.Size]byte]string
}

// owner is who sent a request: its hash, and the older hash a job stored
// before this scheme holds.
type owner struct {
	hash, legacy string
}

// errNoOwner is a request whose owner value is empty: every anonymous
// caller would share that owner, so nothing is stored or read under it.
var errNoOwner = errors.New("no owner")

// of returns who sent r. The error is errNoOwner, or storage's when the
// salt cannot be read.
func (o *owners) of(r *http.Request) (owner, error) {
	repl, _ := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
	v := ""
	if repl != nil {
		v = repl.ReplaceAll(o.placeholder, "")
	}
	if strings.TrimSpace(v) == "" {
		return owner{}, errNoOwner
	}
	legacy := sha256.Sum256([]byte("caddy-batch owner\x00" + v))
	who := owner{legacy: hex.EncodeToString(legacy[:])}
	id := sha256.Sum256([]byte(v))
	o.mu.Lock()
	who.hash = o.cache[id]
	o.mu.Unlock()
	if who.hash != "" {
		return who, nil
	}
	salt, err := o.saltOf(r.Context())
	if err != nil {
		return owner{}, err
	}
	key, err := pbkdf2.Key(sha256.New, v, salt, ownerIterations, sha256.Size)
	if err != nil {
		return owner{}, err
	}
	who.hash = ownerHashPrefix + hex.EncodeToString(key)
	o.mu.Lock()
	if len(o.cache) >= maxOwnerCache {
		o.cache = nil
	}
	if o.cache == nil {
		o.cache = map[[sha256.Size]byte]string{}
	}
	o.cache[id] = who.hash
	o.mu.Unlock()
	return who, nil
}

// is reports whether the owner stored as hash is who.
func (who owner) is(hash string) bool {
	mine := who.hash
	if !strings.HasPrefix(hash, ownerHashPrefix) {
		mine = who.legacy
	}
	return subtle.ConstantTimeCompare([]byte(hash), []byte(mine)) == 1
}

// saltOf returns the salt of the storage, made by the first instance that
// needs it.
func (o *owners) saltOf(ctx context.Context) ([]byte, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.salt != nil {
		return o.salt, nil
	}
	if o.store == nil {
		return nil, errors.New("owners need Caddy's storage, and this context has none")
	}
	if err := o.store.Lock(ctx, ownerSaltKey); err != nil {
		return nil, fmt.Errorf("locking the owner salt: %w", err)
	}
	defer func() { _ = o.store.Unlock(context.WithoutCancel(ctx), ownerSaltKey) }()
	salt, err := o.store.Load(ctx, ownerSaltKey)
	switch {
	case errors.Is(err, fs.ErrNotExist) || err == nil && len(salt) != 32:
		salt = make([]byte, 32)
		_, _ = rand.Read(salt)
		if err := o.store.Store(ctx, ownerSaltKey, salt); err != nil {
			return nil, fmt.Errorf("storing the owner salt: %w", err)
		}
	case err != nil:
		return nil, fmt.Errorf("loading the owner salt: %w", err)
	}
	o.salt = salt
	return salt, nil
}

// refuse answers, in format f, a request whose owner could not be told:
// 401 when its value is empty, 503 when storage failed.
func (o *owners) refuse(w http.ResponseWriter, f format, err error) error {
	if !errors.Is(err, errNoOwner) {
		return f.refuse(w, http.StatusServiceUnavailable, "cannot tell who owns this request: "+err.Error(), nil)
	}
	return f.refuse(w, http.StatusUnauthorized, fmt.Sprintf("async batches and Idempotency-Key need an owner, "+
		"and %s is empty for this request: send the credentials it reads, or set the async block's owner "+
		"to a placeholder known when batch runs (authentication in a route before batch, "+
		"or {http.request.cookie.NAME} for cookie sessions)", o.placeholder), nil)
}
