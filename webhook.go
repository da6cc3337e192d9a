package batch

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"net/http"
	"slices"
	"strconv"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
)

// Webhook is told when an async job ends (and, if asked, as it
// progresses): a POST of {"type":"batch.<event>","batch":{progress}} signed
// in the Batch-Signature header as t=<unix time>,v1=<hex HMAC-SHA256 of
// "<t>.<body>" keyed with the secret>. Failed deliveries (errors or non-2xx
// answers) are retried with exponential backoff and jitter.
type Webhook struct {
	// The URL to POST events to.
	URL string `json:"url"`

	// The key that signs each delivery. Required.
	Secret string `json:"secret,omitempty"`

	// Which events to deliver, of completed, error, canceled and progress.
	// Default: completed error canceled.
	Events []string `json:"events,omitempty"`

	// The least time between two progress events of one job. Default: 10s.
	ProgressInterval caddy.Duration `json:"progress_interval,omitempty"`

	// How many times a delivery is tried before it is given up. Default: 6.
	MaxAttempts int `json:"max_attempts,omitempty"`

	client *http.Client
}

var webhookEvents = []string{"completed", "error", "canceled", "progress"}

func (wh *Webhook) provision() error {
	if wh.URL == "" {
		return fmt.Errorf("webhook: url is required")
	}
	if wh.Secret == "" {
		return fmt.Errorf("webhook: secret is required: receivers must be able to verify deliveries")
	}
	if len(wh.Events) == 0 {
		wh.Events = []string{"completed", "error", "canceled"}
	}
	for _, e := range wh.Events {
		if !slices.Contains(webhookEvents, e) {
			return fmt.Errorf("webhook: unknown event %q (want completed, error, canceled or progress)", e)
		}
	}
	if wh.ProgressInterval == 0 {
		wh.ProgressInterval = caddy.Duration(10 * time.Second)
	}
	if wh.MaxAttempts == 0 {
		wh.MaxAttempts = 6
	}
	if wh.ProgressInterval < 0 || wh.MaxAttempts < 0 {
		return fmt.Errorf("webhook: progress_interval and max_attempts must be positive")
	}
	wh.client = &http.Client{Timeout: 10 * time.Second}
	return nil
}

func (wh *Webhook) wants(event string) bool { return slices.Contains(wh.Events, event) }

// webhookBackoff is the wait before the first retry; each retry doubles it.
var webhookBackoff = time.Second

// notify delivers event in the background: delivery never holds up a job.
// Deliveries end with the pool: Destruct gives them a grace, then cancels
// them.
func (h *Handler) notify(p *jobPool, event string, prog progress) {
	wh := h.Async.Webhook
	if wh == nil || !wh.wants(event) {
		return
	}
	body, err := json.Marshal(struct {
		Type  string   `json:"type"`
		Batch progress `json:"batch"`
	}{"batch." + event, prog})
	if err != nil {
		return
	}
	if why := p.startDelivery(); why != "" {
		h.metrics.webhooks.WithLabelValues("given_up").Inc()
		h.logger.Warn("webhook delivery dropped", zap.String("id", prog.ID), zap.String("event", event), zap.String("reason", why))
		return
	}
	go func() {
		defer p.deliveryDone()
		wh.deliver(p.hooks, h, body, prog.ID)
	}()
}

// startDelivery counts a delivery in; it returns why not when it may not
// start.
func (p *jobPool) startDelivery() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case p.hooksClosed:
		return "shutting down"
	case p.deliveries >= maxDeliveries:
		return "too many deliveries in flight"
	}
	p.deliveries++
	p.hookWG.Add(1)
	return ""
}

func (p *jobPool) deliveryDone() {
	p.mu.Lock()
	p.deliveries--
	p.mu.Unlock()
	p.hookWG.Done()
}

func (wh *Webhook) deliver(ctx context.Context, h *Handler, body []byte, id string) {
	wait := webhookBackoff
	for attempt := 1; ; attempt++ {
		status, err := wh.post(ctx, body)
		if err == nil && status >= 200 && status < 300 {
			h.metrics.webhooks.WithLabelValues("delivered").Inc()
			h.logger.Debug("webhook delivered", zap.String("id", id), zap.Int("attempt", attempt))
			return
		}
		h.metrics.webhooks.WithLabelValues("failed").Inc()
		// Full jitter keeps many failed deliveries from retrying in step.
		if attempt == wh.MaxAttempts || ctx.Err() != nil || !sleepCtx(ctx, wait/2+rand.N(wait/2+1)) {
			h.metrics.webhooks.WithLabelValues("given_up").Inc()
			h.logger.Error("webhook delivery given up", zap.String("id", id), zap.Int("attempts", attempt),
				zap.Int("status", status), zap.Error(err), zap.Bool("canceled", ctx.Err() != nil))
			return
		}
		wait = min(wait*2, 5*time.Minute)
	}
}

func (wh *Webhook) post(ctx context.Context, body []byte) (int, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, wh.URL, bytes.NewReader(body))
	if err != nil {
		return 0, err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Batch-Signature", sign(wh.Secret, now().Unix(), body))
	resp, err := wh.client.Do(req)
	if err != nil {
		return 0, err
	}
	resp.Body.Close()
	return resp.StatusCode, nil
}

// sign returns the Batch-Signature header value for body sent at t.
func sign(secret string, t int64, body []byte) string {
	ts := strconv.FormatInt(t, 10)
	mac := hmac.New(sha256.New, []byte(secret))
	mac.Write([]byte(ts))
	mac.Write([]byte{'.'})
	mac.Write(body)
	return "t=" + ts + ",v1=" + hex.EncodeToString(mac.Sum(nil))
}
