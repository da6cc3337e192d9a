package batch

import (
	"context"
	"fmt"
	"net/http"
	"net/url"
	"time"

	"github.com/caddy-batch/batch/internal/pace"
	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

// Values of the pacing option.
const (
	pacingAdaptive = "adaptive"
	pacingOff      = "off"
)

// RateConfig is a rate that operations wait for: a token bucket of
// requests tokens, refilled at requests per interval.
type RateConfig struct {
	// How many operations may start per interval; also the burst allowed
	// after a quiet spell. Required, at least 1.
	Requests int `json:"requests,omitempty"`

	// The interval requests are counted over. Required, positive.
	Interval caddy.Duration `json:"interval,omitempty"`

	// A placeholder that gives each value its own bucket, resolved with
	// the batch request (for async jobs, with the connection facts and
	// inherited headers they keep), such as
	// {http.request.header.X-Tenant}. At most 10,000 keys are kept; idle
	// ones are dropped, and keys beyond the bound share one bucket.
	// Default: one bucket for all.
	Key string `json:"key,omitempty"`
}

// paceRate is the rate for the gate, nil for none.
func (rc *RateConfig) paceRate() *pace.Rate {
	if rc == nil {
		return nil
	}
	return &pace.Rate{Requests: rc.Requests, Interval: time.Duration(rc.Interval)}
}

func (rc *RateConfig) validate() error {
	switch {
	case rc.Requests < 1:
		return fmt.Errorf("rate: requests must be at least 1, got %d", rc.Requests)
	case rc.Interval <= 0:
		return fmt.Errorf("rate: interval must be positive, got %s", time.Duration(rc.Interval))
	}
	return nil
}

// paceOwner returns who the runner's operations wait as. A batch's is set
// as it starts; a job's is made at its first operation, adaptive.
func (rn *runner) paceOwner() *pace.Owner {
	rn.paceOnce.Do(func() {
		if rn.pace == nil {
			rn.pace = &pace.Owner{Adaptive: true, Key: rn.jobRateKey()}
		}
	})
	return rn.pace
}

// batchPaceOwner is who the operations of a batch sent in r wait as.
func batchPaceOwner(r *http.Request, adaptive bool, rate *RateConfig) *pace.Owner {
	o := &pace.Owner{Adaptive: adaptive}
	if rate != nil && rate.Key != "" {
		if repl, ok := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer); ok {
			o.Key = repl.ReplaceAll(rate.Key, "")
		}
	}
	return o
}

// jobRateKey resolves the rate key for a job, which has no request: a
// stand-in with the connection facts and inherited headers it keeps.
func (rn *runner) jobRateKey() string {
	h := rn.h
	if h.Rate == nil || h.Rate.Key == "" {
		return ""
	}
	c := &rn.conn
	req := &http.Request{
		Method: http.MethodPost, URL: &url.URL{Path: c.path}, Proto: c.proto,
		ProtoMajor: c.protoMajor, ProtoMinor: c.protoMinor, Header: rn.inherited.Clone(),
		Body: http.NoBody, Host: c.host, RemoteAddr: c.remoteAddr, RequestURI: c.path, TLS: c.tls,
	}
	if req.Header == nil {
		req.Header = http.Header{} // placeholders of headers read it
	}
	repl := caddy.NewReplacer()
	caddyhttp.PrepareRequest(req.WithContext(context.Background()), repl, &opWriter{header: http.Header{}}, rn.srv)
	return repl.ReplaceAll(h.Rate.Key, "")
}

// waitedOut is the result of an operation whose time ran out waiting
// for a turn downstream.
func (rn *runner) waitedOut(parent context.Context) result {
	if parent.Err() != nil {
		return rn.cutOff(parent)
	}
	return result{status: http.StatusGatewayTimeout, err: fmt.Sprintf(
		"operation timed out after %s waiting to be sent downstream (max_inflight, rate or pacing)", time.Duration(rn.h.OpTimeout))}
}
