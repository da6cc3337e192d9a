package batch

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"runtime/debug"
	"strconv"
	"time"

	"github.com/caddy-batch/batch/internal/jsontext"
	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
)

// batchCtxKey marks the context of a sub-request, so that a batch handler
// reached again from one refuses it.
type ctxKey struct{}

var batchCtxKey ctxKey

var errNestedBatch = errors.New("nested batch")

const errNestedBatchMsg = "nested batch: an operation may not target a batch endpoint"

// connFacts are what sub-requests take from the batch request: they speak
// for the same client over the same connection.
type connFacts struct {
	host, remoteAddr, path string
	proto                  string
	protoMajor, protoMinor int
	tls                    *tls.ConnectionState
}

func connFactsOf(r *http.Request) connFacts {
	return connFacts{
		host: r.Host, remoteAddr: r.RemoteAddr, path: r.URL.Path,
		proto: r.Proto, protoMajor: r.ProtoMajor, protoMinor: r.ProtoMinor,
		tls: r.TLS,
	}
}

// serverOf returns the server a request came through; sub-requests are
// prepared for it.
func serverOf(r *http.Request) (*caddyhttp.Server, error) {
	srv, ok := r.Context().Value(caddyhttp.ServerCtxKey).(*caddyhttp.Server)
	if !ok {
		return nil, caddyhttp.Error(http.StatusInternalServerError, errors.New("batch handler is not running inside an HTTP server"))
	}
	return srv, nil
}

// routable reports whether the server's error routes answer err: those of
// the batch layer (a nested batch, a panic, an answer cut off) it answers
// itself.
func routable(err error) bool {
	var p panicError
	return !errors.Is(err, errNestedBatch) && !errors.As(err, &p) && !errors.Is(err, http.ErrAbortHandler)
}

// handleError runs the server's error routes for an operation whose
// handler returned err, as caddyhttp.Server.ServeHTTP does for a lone
// request, so that the operation's result is the lone answer: the error
// page of handle_errors, its status and headers, {err.*} set.
func (rn *runner) handleError(w *opWriter, req *http.Request, err error) error {
	// The original request, as the server restores it (issue #3717).
	if orig, ok := req.Context().Value(caddyhttp.OriginalRequestCtxKey).(http.Request); ok {
		req.Method, req.RemoteAddr, req.RequestURI = orig.Method, orig.RemoteAddr, orig.RequestURI
		u := *orig.URL
		req.URL = &u
	}
	req = rn.srv.Errors.WithError(req, err)
	if err2 := callNext(rn.errorChain(), w, req); err2 != nil {
		w.WriteHeader(errorStatus(err))
	}
	return nil
}

// errorStatus is the status of a handler's error, 500 unless it says.
func errorStatus(err error) int {
	var he caddyhttp.HandlerError
	if errors.As(err, &he) && he.StatusCode != 0 {
		return he.StatusCode
	}
	return http.StatusInternalServerError
}

// errorChain returns the server's error routes compiled, as the server
// compiles them: ending in a handler that writes the error's status.
func (rn *runner) errorChain() caddyhttp.Handler {
	h, srv := rn.h, rn.srv
	if c, ok := h.errorChains.Load(srv); ok {
		return c.(caddyhttp.Handler)
	}
	c := srv.Errors.Routes.Compile(caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		err, _ := r.Context().Value(caddyhttp.ErrorCtxKey).(error)
		w.WriteHeader(errorStatus(err))
		return nil
	}))
	h.errorChains.Store(srv, c)
	return c
}

// errorResult is the result of an operation whose handler returned err.
func (rn *runner) errorResult(op *operation, w *opWriter, err error) result {
	var p panicError
	switch {
	case errors.Is(err, errNestedBatch):
		return result{status: http.StatusBadRequest, err: errNestedBatchMsg}
	case errors.As(err, &p):
		rn.h.logger.Error("panic in handler serving batch operation",
			zap.String("batch", rn.id), zap.String("op", op.id), zap.Any("panic", p.value), zap.String("stack", p.stack))
		return result{status: http.StatusInternalServerError, err: "handler panicked"}
	case errors.Is(err, http.ErrAbortHandler):
		return result{status: http.StatusBadGateway, err: "response was cut off"}
	}
	// Handlers often return an error instead of writing one; it decides
	// the status, and what they wrote before (WWW-Authenticate, say) stays.
	return result{status: errorStatus(err), header: w.header}
}

// newRequest builds the sub-request of op: a fresh request with its own
// replacer, vars and route-group state, carrying the outer request's
// connection facts and inherited headers under its own.
func (rn *runner) newRequest(ctx context.Context, op *operation, w http.ResponseWriter, attempt int) *http.Request {
	c := &rn.conn
	// The first attempt takes the URL parsed for the operation alone.
	// Handlers such as rewrite change r.URL in place: a retry parses the
	// target again, which was validated and cannot fail.
	u := op.url
	if attempt > 1 {
		u = new(url.URL)
		_ = parseTargetInto(op.target, u)
	}
	// Built on the stack and copied once by WithContext: one Request on
	// the heap. The header map is the request's own.
	base := http.Request{
		Method:     op.method,
		URL:        u,
		Proto:      c.proto,
		ProtoMajor: c.protoMajor,
		ProtoMinor: c.protoMinor,
		Header:     make(http.Header, len(rn.inherited)+len(op.header)),
		Body:       http.NoBody,
		Host:       c.host,
		RemoteAddr: c.remoteAddr, // before PrepareRequest: it derives the client IP from it
		RequestURI: op.target,
		TLS:        c.tls,
	}
	req := base.WithContext(ctx)
	for k, v := range rn.inherited {
		req.Header[k] = v[:len(v):len(v)] // appends copy: parallel ops share these slices
	}
	for k, v := range op.header {
		req.Header[k] = v[:len(v):len(v)]
	}
	if rn.opKey != "" {
		if _, own := op.header[rn.opKey]; !own {
			req.Header[rn.opKey] = []string{rn.id + "." + op.id}
		}
	}
	if op.body != nil {
		body := op.body
		req.ContentLength = int64(len(body))
		req.Body = io.NopCloser(bytes.NewReader(body))
		req.GetBody = func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(body)), nil }
	}

	repl := caddy.NewReplacer()
	repl.Map(func(key string) (any, bool) {
		switch key {
		case "http.batch.id":
			return rn.id, true
		case "http.batch.index":
			return strconv.Itoa(op.index), true
		case "http.batch.op_id":
			return op.id, true
		}
		return nil, false
	})
	return caddyhttp.PrepareRequest(req, repl, w, rn.srv)
}

// Outer headers an operation never inherits: they describe the outer
// message or connection, or ask something of the batch as a whole.
var notInherited = map[string]bool{
	"Connection": true, "Keep-Alive": true, "Te": true, "Trailer": true,
	"Transfer-Encoding": true, "Upgrade": true, "Accept-Encoding": true,
	"Expect": true, "Prefer": true, "Idempotency-Key": true,
}

func notInheritable(name string) bool {
	return notInherited[name] ||
		len(name) > 6 && (name[:6] == "Proxy-") ||
		len(name) > 8 && name[:8] == "Content-"
}

// inheritedHeaders returns the outer headers each operation starts from:
// those of only (canonical names) if not nil, else all but the excluded.
func inheritedHeaders(outer http.Header, only []string) http.Header {
	hdr := make(http.Header, len(outer))
	if only != nil {
		for _, name := range only {
			if v, ok := outer[name]; ok && !notInheritable(name) {
				hdr[name] = v
			}
		}
		return hdr
	}
	for name, v := range outer {
		if !notInheritable(name) {
			hdr[name] = v
		}
	}
	// Headers the Connection header names are hop-by-hop too.
	for _, v := range outer["Connection"] {
		for _, name := range splitComma(v) {
			delete(hdr, http.CanonicalHeaderKey(name))
		}
	}
	return hdr
}

// callNext runs next, turning a panic into an error so that it fails one
// operation, not the batch or the server.
func callNext(next caddyhttp.Handler, w http.ResponseWriter, r *http.Request) (err error) {
	defer func() {
		if v := recover(); v != nil {
			if v == http.ErrAbortHandler { //nolint:errorlint // sentinel compared as Go's server does
				err = http.ErrAbortHandler
				return
			}
			err = panicError{value: v, stack: stack()}
		}
	}()
	return next.ServeHTTP(w, r)
}

type panicError struct {
	value any
	stack string
}

func (p panicError) Error() string { return fmt.Sprintf("panic: %v", p.value) }

// opWriter captures one operation's answer. It never touches the client's
// writer: sub-responses must not leak headers into the batch response.
type opWriter struct {
	header   http.Header
	status   int
	body     []byte
	size     int64 // of the headers
	limit    int64
	overflow bool
}

var errResponseTooLarge = errors.New("operation response larger than max_response_size")

func (w *opWriter) Header() http.Header { return w.header }

func (w *opWriter) WriteHeader(code int) {
	if w.status != 0 || code < 200 { // informational answers are not the result
		return
	}
	w.status = code
	// The headers count against max_response_size too.
	n := int64(0)
	for k, vs := range w.header {
		for _, v := range vs {
			n += int64(len(k) + len(v) + 4)
		}
	}
	w.size = n
	if n > w.limit {
		w.overflow = true
	}
}

func (w *opWriter) Write(p []byte) (int, error) {
	if w.status == 0 {
		w.WriteHeader(http.StatusOK)
	}
	if w.overflow || w.size+int64(len(w.body)+len(p)) > w.limit {
		w.overflow = true
		return 0, errResponseTooLarge
	}
	w.body = append(w.body, p...)
	return len(p), nil
}

// Flush is a no-op: the answer is complete only when the handler returns.
func (w *opWriter) Flush() {}

func stack() string { return string(debug.Stack()) }

// attempt serves op once within ctx; attempt counts from 1.
func (rn *runner) attempt(ctx context.Context, clk *opClock, op *operation, attempt int) result {
	parent := clk.parent
	if ended(parent) {
		return rn.cutOff(parent) // while it waited for its turn
	}
	w := clk.spare
	if w != nil {
		clk.spare = nil
		clear(w.header)
		*w = opWriter{header: w.header, body: w.body[:0]}
	} else {
		w = &opWriter{header: make(http.Header)}
	}
	w.limit = rn.h.MaxResponseSize
	req := rn.newRequest(ctx, op, w, attempt)
	var logged *http.Request
	start := time.Now()
	if rn.logs != nil {
		logged = req.Clone(req.Context()) // as it entered the chain, as the server logs it
	}
	err := callNext(rn.next, w, req)
	if err != nil && rn.srv.Errors != nil && len(rn.srv.Errors.Routes) > 0 && routable(err) {
		err = rn.handleError(w, req, err)
	}
	if logged != nil {
		rn.logOperation(logged, req, op, w, time.Since(start))
	}

	if c := rn.h.logger.Check(zapcore.DebugLevel, "batch operation"); c != nil {
		c.Write(zap.String("batch", rn.id), zap.String("op", op.id), zap.String("method", op.method),
			zap.String("path", op.target), zap.Int("status", w.status), zap.Error(err))
	}

	switch {
	case w.overflow:
		return result{status: http.StatusBadGateway, err: fmt.Sprintf("response larger than max_response_size (%d bytes)", rn.h.MaxResponseSize)}
	case parent.Err() != nil:
		return rn.cutInFlight(parent)
	case ctx.Err() != nil:
		return result{status: http.StatusGatewayTimeout, err: "operation timed out after " + time.Duration(rn.h.OpTimeout).String()}
	}
	if err != nil {
		return rn.errorResult(op, w, err)
	}
	status := w.status
	if status == 0 {
		status = http.StatusOK
	}
	return result{status: status, header: w.header, body: w.body, w: w, isJSON: jsonBody(w.header, w.body)}
}

// maxAnswerDepth bounds the nesting of an answer embedded as JSON. The JSON
// check recurses once per level, and an answer nested deeper (a client can
// have an API store any blob and return it) would overflow the stack, which
// no recover catches; such an answer goes in as text.
const maxAnswerDepth = 512

// jsonBody reports whether an answer's body is JSON by its Content-Type,
// valid, in UTF-8 and at most maxAnswerDepth deep, so that it can stand in
// the batch's JSON as a value: the batch answer must stay valid JSON text.
func jsonBody(header http.Header, body []byte) bool {
	return len(body) > 0 && isJSONType(contentType(header)) && jsontext.Valid(body, maxAnswerDepth)
}

// contentType is h.Get("Content-Type"), without canonicalizing a name
// that already is: it is read for every result.
func contentType(h http.Header) string {
	if v := h["Content-Type"]; len(v) > 0 {
		return v[0]
	}
	return ""
}
