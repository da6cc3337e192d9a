package batch

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
)

// A job's operations are stored in one of two shapes. A batch taken whole
// (at most max_ops and max_body_size) is stored as it was sent, in one
// chunk, and runs as one batch, with everything a batch may hold. A batch
// streamed into storage (NDJSON, or more than a batch may hold) is stored
// as JSON arrays of at most opsPerChunk independent operations (or bulk
// items), each run as a batch of its own, one after the other: no more of
// a job is in memory than one chunk.
const (
	shapeBody  = "body"
	shapeOps   = "ops"
	shapeItems = "items"

	opsPerChunk  = 1000
	opsChunkSize = 1 << 20
)

// jobSpec is what storage holds to run a job on any instance: written
// once, when it is submitted.
type jobSpec struct {
	Shape string `json:"shape"`
	// Starts holds the index of the first operation of each chunk.
	Starts []int `json:"starts"`
	// ContentType and Path are those of the batch request, which a body
	// is decoded with again.
	ContentType string `json:"content_type,omitempty"`
	Path        string `json:"path"`
	// Template is the operation of a bulk batch whose items are stored.
	Template json.RawMessage `json:"template,omitempty"`
	// Options of a streamed batch.
	Mode        string `json:"mode,omitempty"`
	Atomicity   string `json:"atomicity,omitempty"`
	OmitSuccess bool   `json:"omit_response_on_success,omitempty"`
	NoHeaders   bool   `json:"no_headers,omitempty"`

	Conn storedConn `json:"conn"`
	// Headers are the inherited headers when none can hold a credential;
	// Sealed holds them encrypted instead when a credentials key is set.
	// Local is set when they are neither: they stay in the memory of the
	// process that took the job, which alone can run it.
	Headers http.Header `json:"headers,omitempty"`
	Sealed  []byte      `json:"sealed,omitempty"`
	Local   bool        `json:"local,omitempty"`
	// SealedOps is set when the chunks of operations are encrypted.
	SealedOps bool `json:"sealed_ops,omitempty"`

	// Endpoint is where the job was submitted (server, host, batch path);
	// Handler identifies the handler that took it, in its config.
	Endpoint string `json:"endpoint"`
	Handler  string `json:"handler,omitempty"`
}

// storedConn is what a sub-request takes from the batch request's
// connection. Of TLS, the facts matchers and placeholders read: client
// certificates are not kept.
type storedConn struct {
	Host       string `json:"host"`
	RemoteAddr string `json:"remote_addr"`
	Proto      string `json:"proto"`
	TLS        *struct {
		Version     uint16 `json:"version"`
		CipherSuite uint16 `json:"cipher_suite"`
		ServerName  string `json:"server_name,omitempty"`
		ALPN        string `json:"alpn,omitempty"`
	} `json:"tls,omitempty"`
}

func storeConn(c connFacts) storedConn {
	s := storedConn{Host: c.host, RemoteAddr: c.remoteAddr, Proto: c.proto}
	if c.tls != nil {
		s.TLS = &struct {
			Version     uint16 `json:"version"`
			CipherSuite uint16 `json:"cipher_suite"`
			ServerName  string `json:"server_name,omitempty"`
			ALPN        string `json:"alpn,omitempty"`
		}{c.tls.Version, c.tls.CipherSuite, c.tls.ServerName, c.tls.NegotiatedProtocol}
	}
	return s
}

func (s storedConn) facts(path string) connFacts {
	c := connFacts{host: s.Host, remoteAddr: s.RemoteAddr, path: path, proto: s.Proto, protoMajor: 1, protoMinor: 1}
	if major, minor, ok := http.ParseHTTPVersion(s.Proto); ok {
		c.protoMajor, c.protoMinor = major, minor
	}
	if t := s.TLS; t != nil {
		c.tls = &tls.ConnectionState{Version: t.Version, CipherSuite: t.CipherSuite, ServerName: t.ServerName,
			NegotiatedProtocol: t.ALPN, HandshakeComplete: true}
	}
	return c
}

// clearHeaders are inherited headers that carry no credential: a job
// inheriting only these can be stored whole without a credentials key.
var clearHeaders = map[string]bool{
	"Accept": true, "Accept-Charset": true, "Accept-Language": true, "User-Agent": true,
	"Cache-Control": true, "Pragma": true, "Origin": true, "X-Requested-With": true,
	"X-Request-Id": true, "Traceparent": true, "Tracestate": true,
}

// keepHeaders decides how spec holds the inherited headers.
func (h *Handler) keepHeaders(spec *jobSpec, id string, inherited http.Header) error {
	if len(inherited) == 0 {
		return nil
	}
	if h.sealer != nil {
		buf, err := json.Marshal(inherited)
		if err != nil {
			return err
		}
		spec.Sealed = h.sealer.Seal(jobKey(id, "headers"), buf)
		return nil
	}
	for name := range inherited {
		if !clearHeaders[name] {
			spec.Local = true
			return nil
		}
	}
	spec.Headers = inherited
	return nil
}

// openHeaders returns the inherited headers of a stored job.
func (h *Handler) openHeaders(spec *jobSpec, id string) (http.Header, error) {
	switch {
	case spec.Local:
		return nil, errLocalCredentials
	case spec.Sealed == nil:
		return spec.Headers, nil
	}
	buf, err := h.sealer.Open(jobKey(id, "headers"), spec.Sealed)
	if err != nil {
		return nil, err
	}
	var hdr http.Header
	if err := json.Unmarshal(buf, &hdr); err != nil {
		return nil, fmt.Errorf("%w: inherited headers: %w", errBadRecord, err)
	}
	return hdr, nil
}

var errLocalCredentials = errors.New("its operations inherit credentials that were kept only in the memory of the instance that took it (set credentials_key to resume such jobs)")

// chunkKey is where chunk n of a job's operations is stored.
func chunkKey(id string, n int) string { return jobKey(id, "ops", fmt.Sprintf("%06d", n)) }

// storeChunk stores a chunk of operations, sealed when the job's are.
func (h *Handler) storeChunk(ctx context.Context, spec *jobSpec, id string, n int, buf []byte) error {
	key := chunkKey(id, n)
	if spec.SealedOps {
		buf = h.sealer.Seal(key, buf)
	}
	return h.storage.Store(ctx, key, buf)
}

// loadChunk loads chunk n of a job's operations and decodes it as the
// batch it runs as, with its operations numbered from first.
func (h *Handler) loadChunk(ctx context.Context, spec *jobSpec, id, format string, n, first int) (*batch, error) {
	key := chunkKey(id, n)
	buf, err := h.storage.Load(ctx, key)
	if err != nil {
		return nil, fmt.Errorf("loading operations: %w", err)
	}
	if spec.SealedOps {
		if buf, err = h.sealer.Open(key, buf); err != nil {
			return nil, err
		}
	}
	lim := h.limits
	lim.maxOps = max(lim.maxOps, opsPerChunk)
	lim.firstID = first
	req := (&http.Request{Method: http.MethodPost, URL: &url.URL{Path: spec.Path},
		Header: http.Header{"Content-Type": {spec.ContentType}}}).WithContext(ctx)
	var b *batch
	switch spec.Shape {
	case shapeBody:
		f := formatNamed(format)
		if f == nil {
			return nil, fmt.Errorf("unknown format %q", format)
		}
		if b, err = f.decode(req, buf, &lim); err == nil {
			b.format = f
		}
	case shapeOps, shapeItems:
		b, err = parseChunk(ctx, spec, buf, &lim)
	default:
		err = fmt.Errorf("%w: shape %q", errBadRecord, spec.Shape)
	}
	if err != nil {
		return nil, fmt.Errorf("operations no longer valid: %w", err)
	}
	b.async = true
	return b, nil
}

// parseChunk decodes a chunk of a streamed job: the operations, or the
// bulk items, of one batch with the job's options.
func parseChunk(ctx context.Context, spec *jobSpec, chunk []byte, lim *rules) (*batch, error) {
	var body []byte
	if spec.Shape == shapeItems {
		body = append(append(append(append([]byte(`{"operation":`), spec.Template...), `,"items":`...), chunk...), '}')
	} else {
		body = append(append([]byte(`{"batch":`), chunk...), '}')
	}
	lim.mode, lim.atomicity = spec.Mode, spec.Atomicity
	b, err := parseBatch(ctx, body, lim)
	if err != nil {
		return nil, err
	}
	b.format = native
	b.lean = leanOptions{omitSuccess: spec.OmitSuccess, noHeaders: spec.NoHeaders}
	return b, nil
}
