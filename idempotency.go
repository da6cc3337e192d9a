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
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
)

// A batch sent with an Idempotency-Key runs once: the same key with the same
// body within the retention replays the stored answer; with another body
// it is refused (422). Keys belong to an owner, as async jobs do, and live
// in Caddy's storage under its lock, so that this holds across instances.
//
// An answer is held in memory up to max_idempotent_size and stored before
// the client gets it, so that a slow reader holds up no one waiting for the
// key; a larger one is passed on as it comes, and nothing is stored.

const (
	idempotencyPrefix        = "batch/idempotency"
	maxIdempotencyKey        = 255
	defaultMaxIdempotentSize = 1 << 20
	// storageTimeout bounds a storage call made while the key is held and
	// the client may have left.
	storageTimeout = 10 * time.Second
)

// idempotentAnswer is what storage keeps of a batch sent with a key: this
// as one line of JSON, then the answer's body.
type idempotentAnswer struct {
	BodyHash string `json:"body_hash"`
	Status   int    `json:"status"`
	// Header holds the headers the batch set on its answer.
	Header    http.Header `json:"header,omitempty"`
	ExpiresAt time.Time   `json:"expires_at"`
	// Records written before the body followed the line held it here
	// (base64), and of the headers only the Location.
	Location string `json:"location,omitempty"`
	Body     []byte `json:"body,omitempty"`
}

// encode returns the record storage keeps.
func (a idempotentAnswer) encode() ([]byte, error) {
	body := a.Body
	a.Body = nil
	line, err := json.Marshal(a)
	if err != nil {
		return nil, err
	}
	buf := make([]byte, 0, len(line)+1+len(body))
	return append(append(append(buf, line...), '\n'), body...), nil
}

// decodeAnswer reads a record that encode wrote, or an older one.
func decodeAnswer(buf []byte) (idempotentAnswer, error) {
	var a idempotentAnswer
	line, body, found := bytes.Cut(buf, []byte{'\n'}) // json.Marshal writes none
	if err := json.Unmarshal(line, &a); err != nil {
		return a, fmt.Errorf("%w: idempotent answer: %w", errBadRecord, err)
	}
	if a.BodyHash == "" || a.Status < 200 || a.Status > 599 {
		return a, fmt.Errorf("%w: idempotent answer without body hash or status", errBadRecord)
	}
	if found {
		a.Body = body
	} else if a.Header == nil {
		// Older records were all JSON.
		a.Header = http.Header{"Content-Type": {"application/json"}}
		if a.Location != "" {
			a.Header.Set("Location", a.Location)
		}
	}
	return a, nil
}

// serveIdempotent runs a valid batch sent with an Idempotency-Key once.
func (h *Handler) serveIdempotent(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler, b *batch, key string, body []byte) error {
	sum := sha256.Sum256(body)
	return h.serveOnce(w, r, b.format, key, hex.EncodeToString(sum[:]), func(w http.ResponseWriter, status func() int) (bool, error) {
		if b.async {
			err := h.jobs.submit(w, r, next, b, body)
			return status() == http.StatusAccepted, err
		}
		sum, err := h.run(w, r, next, b)
		return (status() == http.StatusOK || status() == http.StatusAccepted) && sum.cut == 0, err // 202: an OData V2 batch
	})
}

// answerName is where the answer to key, sent by owner, is stored.
func answerName(owner, key string) string {
	id := sha256.Sum256([]byte(owner + "\x00" + key))
	return path.Join(idempotencyPrefix, hex.EncodeToString(id[:]))
}

// serveOnce answers a batch request sent with an Idempotency-Key key, whose
// body hashes to bodyHash: with the answer stored for the key, or by
// serve, whose answer is stored when it says it should be (given the
// status it wrote).
func (h *Handler) serveOnce(w http.ResponseWriter, r *http.Request, f format, key, bodyHash string,
	serve func(w http.ResponseWriter, status func() int) (keep bool, err error)) error {
	if len(key) > maxIdempotencyKey {
		return writeError(w, http.StatusBadRequest, fmt.Sprintf("Idempotency-Key must be at most %d characters", maxIdempotencyKey))
	}
	who, err := h.owners.of(r)
	if err != nil {
		return h.owners.refuse(w, f, err)
	}
	name := answerName(who.hash, key)

	// The locks make concurrent repeats wait for the first: in this process
	// on a lock that wakes at once, and across instances on storage's.
	hold, err := h.holdKey(r.Context(), name)
	if err != nil {
		if r.Context().Err() != nil {
			return nil // the client left while it waited
		}
		return caddyhttp.Error(http.StatusServiceUnavailable, fmt.Errorf("locking idempotency key: %w", err))
	}
	defer hold.release()

	prev, err := h.loadAnswer(r.Context(), name)
	if errors.Is(err, fs.ErrNotExist) {
		// Stored before owners were salted: the same key of the same
		// owner, under its older name.
		prev, err = h.loadAnswer(r.Context(), answerName(who.legacy, key))
	}
	switch {
	case err == nil && now().Before(prev.ExpiresAt):
		hold.release() // a slow reader of the replay holds up nobody
		if prev.BodyHash != bodyHash {
			return writeError(w, http.StatusUnprocessableEntity, "Idempotency-Key was already used with a different batch")
		}
		for k, v := range prev.Header {
			w.Header()[k] = v
		}
		w.Header().Set("Idempotent-Replayed", "true")
		w.Header().Set("Content-Length", strconv.Itoa(len(prev.Body)))
		w.WriteHeader(prev.Status)
		_, _ = w.Write(prev.Body)
		return nil
	case errors.Is(err, errBadRecord):
		// Refusing the key would refuse it until the record is swept; this
		// batch's answer replaces it.
		h.logger.Error("running a batch again over an unreadable idempotent answer", zap.String("record", name), zap.Error(err))
	case err != nil && !errors.Is(err, fs.ErrNotExist):
		return caddyhttp.Error(http.StatusServiceUnavailable, fmt.Errorf("loading idempotent answer: %w", err))
	}

	iw := &idempotentWriter{ResponseWriter: w, limit: int(h.MaxIdempotentSize), before: w.Header().Clone(), outgrown: hold.release}
	// Only an answer that says what the batch did is kept: a job that was
	// queued, or a batch none of whose operations its end (client gone,
	// timeout, shutdown) cut off. Any other leaves the key free for a retry
	// to run the batch whole.
	ran, err := serve(iw, func() int { return iw.status })
	if iw.passed {
		return err
	}
	stored := err == nil && ran && h.storeAnswer(r.Context(), name, idempotentAnswer{
		BodyHash:  bodyHash,
		Status:    iw.status,
		Header:    iw.header(),
		Body:      iw.buf,
		ExpiresAt: now().Add(h.retention()),
	})
	// Stored before it is sent: the key is not held while the client reads.
	hold.release()
	if iw.status != 0 {
		iw.send(stored)
	}
	return err
}

// storeAnswer keeps an answer for its key, and reports whether it did.
func (h *Handler) storeAnswer(ctx context.Context, name string, ans idempotentAnswer) bool {
	buf, err := ans.encode()
	if err != nil {
		h.logger.Error("encoding idempotent answer", zap.Error(err))
		return false
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), storageTimeout)
	defer cancel()
	if err := h.storage.Store(ctx, name, buf); err != nil {
		h.logger.Error("storing idempotent answer", zap.Error(err))
		return false
	}
	return true
}

func (h *Handler) loadAnswer(ctx context.Context, name string) (idempotentAnswer, error) {
	buf, err := h.storage.Load(ctx, name)
	if err != nil {
		return idempotentAnswer{}, err
	}
	return decodeAnswer(buf)
}

// retention is how long jobs and idempotent answers are kept.
func (h *Handler) retention() time.Duration {
	if h.Async != nil {
		return time.Duration(h.Async.Retention)
	}
	return defaultRetention
}

// idempotentWriter holds an answer of up to limit bytes, to be stored
// before the client gets it. One that outgrows limit is passed on as it
// comes, with "Idempotent-Stored: false", and outgrown is called: as
// nothing will be stored, the key is let go.
type idempotentWriter struct {
	http.ResponseWriter
	limit    int
	before   http.Header // the client's headers before the batch ran
	outgrown func()
	status   int
	buf      []byte
	passed   bool
}

func (w *idempotentWriter) WriteHeader(code int) {
	if w.status == 0 && code >= 200 {
		w.status = code
	}
}

func (w *idempotentWriter) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.status = http.StatusOK
	}
	if !w.passed && len(w.buf)+len(p) > w.limit {
		w.passOn()
	}
	if w.passed {
		return w.ResponseWriter.Write(p)
	}
	if len(w.buf)+len(p) > cap(w.buf) {
		// Doubled as append would, but never past limit.
		grown := make([]byte, len(w.buf), min(max(2*cap(w.buf), len(w.buf)+len(p)), w.limit))
		copy(grown, w.buf)
		w.buf = grown
	}
	w.buf = append(w.buf, p...)
	return len(p), nil
}

func (w *idempotentWriter) passOn() {
	w.passed = true
	w.Header().Set("Idempotent-Stored", "false")
	w.ResponseWriter.WriteHeader(w.status)
	_, _ = w.ResponseWriter.Write(w.buf)
	w.buf = nil
	w.outgrown()
}

// header returns the headers the batch set on its answer. Those set before
// it ran, the handlers before it set again on a replay; Content-Length
// and Idempotent-Stored are the replay's own.
func (w *idempotentWriter) header() http.Header {
	set := http.Header{}
	for k, v := range w.Header() {
		if k != "Content-Length" && k != "Idempotent-Stored" && !slices.Equal(v, w.before[k]) {
			set[k] = v
		}
	}
	return set
}

// send writes the answer held, saying whether it was stored.
func (w *idempotentWriter) send(stored bool) {
	w.Header().Set("Idempotent-Stored", strconv.FormatBool(stored))
	w.Header().Set("Content-Length", strconv.Itoa(len(w.buf)))
	w.ResponseWriter.WriteHeader(w.status)
	_, _ = w.ResponseWriter.Write(w.buf)
}

// FlushError flushes only an answer passed on: one held is sent whole.
func (w *idempotentWriter) FlushError() error {
	if !w.passed {
		return nil
	}
	return http.NewResponseController(w.ResponseWriter).Flush()
}

// Unwrap lets http.ResponseController reach the client's writer.
func (w *idempotentWriter) Unwrap() http.ResponseWriter { return w.ResponseWriter }

// keyHold is a hold on one idempotency key: this process's lock on it,
// then storage's.
type keyHold struct {
	once   sync.Once
	unlock func()
}

func (h *Handler) holdKey(ctx context.Context, name string) (*keyHold, error) {
	unlock, err := h.keyLocks.lock(ctx, name)
	if err != nil {
		return nil, err
	}
	if err := h.storage.Lock(ctx, name); err != nil {
		unlock()
		return nil, err
	}
	return &keyHold{unlock: func() {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), storageTimeout)
		defer cancel()
		if err := h.storage.Unlock(ctx, name); err != nil {
			h.logger.Error("unlocking idempotency key", zap.Error(err))
		}
		unlock()
	}}, nil
}

// release lets go of the key; it may be called again.
func (k *keyHold) release() { k.once.Do(k.unlock) }

// keyLocks are in-process locks by name, dropped when unused. Waiting for
// one ends with the waiter's context: a client that leaves while another
// holds its key stops waiting, and holds nothing.
type keyLocks struct {
	mu sync.Mutex
	m  map[string]*keyLock
}

type keyLock struct {
	held chan struct{} // holds a token while locked; waiters queue in order
	refs int
}

// lock locks name, or fails when ctx ends first, and returns its unlock.
func (k *keyLocks) lock(ctx context.Context, name string) (unlock func(), err error) {
	l := k.ref(name)
	select {
	case l.held <- struct{}{}:
		return func() { <-l.held; k.unref(name, l) }, nil
	case <-ctx.Done():
		k.unref(name, l)
		return nil, ctx.Err()
	}
}

// tryLock locks name unless it is locked, and returns its unlock.
func (k *keyLocks) tryLock(name string) (unlock func(), ok bool) {
	l := k.ref(name)
	select {
	case l.held <- struct{}{}:
		return func() { <-l.held; k.unref(name, l) }, true
	default:
		k.unref(name, l)
		return nil, false
	}
}

// ref returns the lock of name, counting a user.
func (k *keyLocks) ref(name string) *keyLock {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.m == nil {
		k.m = map[string]*keyLock{}
	}
	l := k.m[name]
	if l == nil {
		l = &keyLock{held: make(chan struct{}, 1)}
		k.m[name] = l
	}
	l.refs++
	return l
}

// unref drops a user of l, and l with the last.
func (k *keyLocks) unref(name string, l *keyLock) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if l.refs--; l.refs == 0 {
		delete(k.m, name)
	}
}
