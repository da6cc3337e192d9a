package batch

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"path"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

// A batch sent with an Idempotency-Key runs once: the same key with the same
// body within the retention replays the stored answer; with another body
// it is refused (422). Keys belong to an owner, as async jobs do, and live
// in Caddy's storage under its lock, so that this holds across instances.

const (
	idempotencyPrefix = "batch/idempotency"
	maxIdempotencyKey = 255
)

// idempotentAnswer is what storage keeps of a batch sent with a key.
type idempotentAnswer struct {
	BodyHash  string    `json:"body_hash"`
	Status    int       `json:"status"`
	Location  string    `json:"location,omitempty"`
	Body      []byte    `json:"body"`
	ExpiresAt time.Time `json:"expires_at"`
}

// serveIdempotent runs a valid batch sent with an Idempotency-Key once.
func (h *Handler) serveIdempotent(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler, b *batch, key string, body []byte) error {
	if len(key) > maxIdempotencyKey {
		return writeError(w, http.StatusBadRequest, fmt.Sprintf("Idempotency-Key must be at most %d characters", maxIdempotencyKey))
	}
	owner, ok := h.ownerHash(r)
	if !ok {
		return h.writeNoOwner(w)
	}
	id := sha256.Sum256([]byte(owner + "\x00" + key))
	name := path.Join(idempotencyPrefix, hex.EncodeToString(id[:]))
	sum := sha256.Sum256(body)
	bodyHash := hex.EncodeToString(sum[:])

	// The locks make concurrent repeats wait for the first: in this process
	// on a mutex, which wakes at once, and across instances on storage's.
	unlock := h.keyLocks.lock(name)
	defer unlock()
	if err := h.store().Lock(r.Context(), name); err != nil {
		return caddyhttp.Error(http.StatusServiceUnavailable, fmt.Errorf("locking idempotency key: %w", err))
	}
	defer func() {
		if err := h.store().Unlock(context.WithoutCancel(r.Context()), name); err != nil {
			h.logger.Error("unlocking idempotency key", zap.Error(err))
		}
	}()

	prev, err := h.loadAnswer(r.Context(), name)
	switch {
	case err == nil && now().Before(prev.ExpiresAt):
		if prev.BodyHash != bodyHash {
			return writeError(w, http.StatusUnprocessableEntity, "Idempotency-Key was already used with a different batch")
		}
		if prev.Location != "" {
			w.Header().Set("Location", prev.Location)
		}
		w.Header().Set("Idempotent-Replayed", "true")
		writeJSON(w, prev.Status, prev.Body)
		return nil
	case err != nil && !errors.Is(err, fs.ErrNotExist):
		return caddyhttp.Error(http.StatusServiceUnavailable, fmt.Errorf("loading idempotent answer: %w", err))
	}

	// The answer is kept whole to be stored: an idempotent batch is not
	// streamed to storage, but it is to the client.
	cw := &captureWriter{ResponseWriter: w}
	if b.async || h.Async != nil && wantsAsync(r) {
		err = h.submit(cw, r, next, b)
	} else {
		_, err = h.run(cw, r, next, b)
	}
	if err != nil {
		return err
	}
	ans := idempotentAnswer{
		BodyHash:  bodyHash,
		Status:    cw.status,
		Location:  w.Header().Get("Location"),
		Body:      cw.body.Bytes(),
		ExpiresAt: now().Add(h.retention()),
	}
	if buf, err := json.Marshal(ans); err != nil {
		h.logger.Error("encoding idempotent answer", zap.Error(err))
	} else if err := h.store().Store(context.WithoutCancel(r.Context()), name, buf); err != nil {
		h.logger.Error("storing idempotent answer", zap.Error(err))
	}
	return nil
}

func (h *Handler) loadAnswer(ctx context.Context, name string) (idempotentAnswer, error) {
	var ans idempotentAnswer
	buf, err := h.store().Load(ctx, name)
	if err != nil {
		return ans, err
	}
	return ans, json.Unmarshal(buf, &ans)
}

// retention is how long jobs and idempotent answers are kept.
func (h *Handler) retention() time.Duration {
	if h.Async != nil {
		return time.Duration(h.Async.Retention)
	}
	return defaultRetention
}

const defaultRetention = 24 * time.Hour

// captureWriter passes an answer to the client and keeps a copy of it.
type captureWriter struct {
	http.ResponseWriter
	status int
	body   bytes.Buffer
}

func (w *captureWriter) WriteHeader(code int) {
	if w.status == 0 {
		w.status = code
	}
	w.ResponseWriter.WriteHeader(code)
}

func (w *captureWriter) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	w.body.Write(p)
	return w.ResponseWriter.Write(p)
}

// Unwrap lets http.ResponseController reach the client's writer.
func (w *captureWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// keyLocks are in-process mutexes by name, dropped when unused.
type keyLocks struct {
	mu sync.Mutex
	m  map[string]*keyLock
}

type keyLock struct {
	sync.Mutex
	refs int
}

// lock locks name and returns its unlock.
func (k *keyLocks) lock(name string) (unlock func()) {
	k.mu.Lock()
	if k.m == nil {
		k.m = map[string]*keyLock{}
	}
	l := k.m[name]
	if l == nil {
		l = new(keyLock)
		k.m[name] = l
	}
	l.refs++
	k.mu.Unlock()
	l.Lock()
	return func() {
		l.Unlock()
		k.mu.Lock()
		if l.refs--; l.refs == 0 {
			delete(k.m, name)
		}
		k.mu.Unlock()
	}
}
