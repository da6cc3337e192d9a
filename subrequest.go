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
	"strings"
	"time"

	"github.com/caddy-batch/batch/internal/pace"
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

// resolveAndExec fills in op's references and runs it.
func (rn *runner) resolveAndExec(op *operation, clk *opClock) result {
	op, err := rn.resolve(op)
	if err != nil {
		return result{status: statusSkipped, err: err.Error()}
	}
	if strings.EqualFold(op.url.Path, rn.conn.path) {
		// The chain after batch would not bring it back here, but a client
		// who sends it means a batch inside a batch.
		return result{status: http.StatusBadRequest, err: errNestedBatchMsg}
	}
	return rn.exec(op, clk)
}

// exec serves one operation through the rest of the handler chain, each
// try after a turn from the handler's gate (max_inflight, rate, pacing).
// An operation answered 429 is tried again: under adaptive pacing, of any
// method, when the pacer says (see pacer.go), until op_timeout; otherwise
// when idempotent, after its Retry-After, up to retry_429 times within
// op_timeout.
func (rn *runner) exec(op *operation, clk *opClock) result {
	ctx, deadline := clk.arm()
	defer clk.disarm()
	o := rn.paceOwner()
	g := rn.h.gate
	for attempt := 1; ; attempt++ {
		var res result
		asked := time.Now()
		t, err := g.Acquire(ctx, o)
		rn.h.metrics.turnWait.Observe(time.Since(asked).Seconds())
		if err != nil {
			res = rn.waitedOut(clk.parent)
		} else {
			res = rn.attempt(ctx, clk, op, attempt)
			if r := g.Release(t, res.status, res.header); r.Event != "" {
				rn.h.metrics.pacing.WithLabelValues(r.Event).Inc()
				rn.h.logger.Debug("pacing", zap.String("event", r.Event), zap.Float64("rate", r.Rate),
					zap.Duration("paused_for", r.Paused), zap.String("batch", rn.id), zap.String("op", op.id))
			}
		}
		retry := res.status == http.StatusTooManyRequests
		var wait time.Duration
		if o.Adaptive {
			// A 429 says the request was refused for its rate, not
			// processed: any method is sent again.
			retry = retry && attempt < pace.MaxAdaptiveAttempts
			wait = g.RetryWait(attempt)
		} else {
			retry = retry && attempt <= rn.h.Retry429 && idempotent(op.method)
			var ok bool
			if wait, ok = pace.RetryAfter(res.header); !ok {
				wait = time.Second // when the answer does not say, or not readably
			}
		}
		if !retry {
			if attempt > 1 {
				res.attempts = attempt
			}
			return res
		}
		if time.Until(deadline) < wait {
			res.attempts = attempt
			return res
		}
		select {
		case <-time.After(wait):
		case <-ctx.Done():
			res.attempts = attempt
			return res
		}
	}
}

// idempotent reports whether a method may be repeated without changing
// what one request would do (RFC 9110 §9.2.2).
func idempotent(method string) bool {
	switch method {
	case http.MethodGet, http.MethodHead, http.MethodPut, http.MethodDelete, http.MethodOptions:
		return true
	}
	return false
}

// attempt serves op once within ctx; attempt counts from 1.
func (rn *runner) attempt(ctx context.Context, clk *opClock, op *operation, attempt int) result {
	parent := clk.parent
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
	err := serve(rn.next, w, req)
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
		return rn.cutOff(parent)
	case ctx.Err() != nil:
		return result{status: http.StatusGatewayTimeout, err: "operation timed out after " + time.Duration(rn.h.OpTimeout).String()}
	}
	if err != nil {
		return rn.failed(op, w, err)
	}
	status := w.status
	if status == 0 {
		status = http.StatusOK
	}
	return result{status: status, header: w.header, body: w.body, w: w, isJSON: jsonBody(w.header, w.body)}
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
	if err2 := serve(rn.h.errorChain(rn.srv), w, req); err2 != nil {
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
func (h *Handler) errorChain(srv *caddyhttp.Server) caddyhttp.Handler {
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

// failed is the result of an operation whose handler returned err.
func (rn *runner) failed(op *operation, w *opWriter, err error) result {
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

// inheritedHeaders returns the outer headers each operation starts from.
func (h *Handler) inheritedHeaders(outer http.Header) http.Header {
	hdr := make(http.Header, len(outer))
	if h.inherit != nil {
		for _, name := range h.inherit {
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

// serve runs next, turning a panic into an error so that it fails one
// operation, not the batch or the server.
func serve(next caddyhttp.Handler, w http.ResponseWriter, r *http.Request) (err error) {
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
