package batch

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
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

	// Which events to deliver, of completed, error, canceled, stopped
	// (the failure budget stopped the job), expired (its completion
	// window passed) and progress. Default: all but progress.
	Events []string `json:"events,omitempty"`

	// The least time between two progress events of one job. Default: 10s.
	ProgressInterval caddy.Duration `json:"progress_interval,omitempty"`

	// How many times a delivery is tried before it is given up. Default: 6.
	MaxAttempts int `json:"max_attempts,omitempty"`

	client *http.Client
}

var webhookEvents = []string{"completed", "error", "canceled", "stopped", "expired", "progress"}

func (wh *Webhook) provision() error {
	if wh.URL == "" {
		return fmt.Errorf("webhook: url is required")
	}
	if wh.Secret == "" {
		return fmt.Errorf("webhook: secret is required: receivers must be able to verify deliveries")
	}
	if len(wh.Events) == 0 {
		wh.Events = []string{"completed", "error", "canceled", "stopped", "expired"}
	}
	for _, e := range wh.Events {
		if !slices.Contains(webhookEvents, e) {
			return fmt.Errorf("webhook: unknown event %q (want completed, error, canceled, stopped, expired or progress)", e)
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
	wh.client = &http.Client{
		Timeout: webhookTimeout,
		// A redirect is a failed delivery: followed, a receiver could
		// point a signed event at any internal URL (Caddy's admin API
		// among them).
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	return nil
}

// webhookTimeout bounds one delivery attempt; a variable, so that tests
// may shorten it.
var webhookTimeout = 10 * time.Second

func (wh *Webhook) wants(event string) bool { return slices.Contains(wh.Events, event) }

// webhookBackoff is the wait before the first retry; each retry doubles it.
var webhookBackoff = time.Second

// notify delivers a progress event in the background, at most once:
// delivery never holds up a job. Deliveries end with the pool: Destruct
// gives them a grace, then cancels them.
func (a *asyncJobs) notify(p *jobPool, event string, prog progress) {
	ev := a.event(event, prog, fmt.Sprintf("%s.%s.%d", prog.ID, event, prog.Completed))
	if ev == nil {
		return
	}
	if why := p.startDelivery(""); why != "" {
		a.dropped(ev, why)
		return
	}
	go func() {
		defer p.deliveryDone("")
		a.deliver(p.hooks, ev)
	}()
}

// webhookEvent is an event for the webhook. The event a job's end is to
// deliver is stored with the job until it is delivered or given up: if
// this instance cannot deliver it, the one that takes the job over does.
type webhookEvent struct {
	// ID names the event, in the Batch-Event-Id header: a receiver
	// dedupes by it, as an event may be delivered more than once.
	ID   string          `json:"id"`
	Body json.RawMessage `json:"body"`
}

// event returns the event to deliver, nil if the webhook does not want it.
func (a *asyncJobs) event(event string, prog progress, id string) *webhookEvent {
	wh := a.cfg.Webhook
	if wh == nil || !wh.wants(event) {
		return nil
	}
	body, err := json.Marshal(struct {
		Type  string   `json:"type"`
		Batch progress `json:"batch"`
	}{"batch." + event, prog})
	if err != nil {
		return nil
	}
	return &webhookEvent{ID: id, Body: body}
}

// endEvent returns the event that the end of a job delivers, if wanted.
func (a *asyncJobs) endEvent(rec jobRecord) *webhookEvent {
	return a.event(rec.Status, rec.progress, rec.ID+"."+rec.Status)
}

// sendEnd delivers the stored event of an ended job, under its lease; once
// it is delivered or given up, the event goes and the job is done with.
// When no delivery can start, the job waits in the cluster's queue for
// the next look to deliver it; when a shutdown cuts one off, it stays held
// until this instance's heartbeat expires, and the instance that takes it
// over delivers it.
func (a *asyncJobs) sendEnd(p *jobPool, jobID string, l *lease, ev *webhookEvent) {
	finish := func() {
		ctx, cancel := context.WithTimeout(context.Background(), storeTimeout)
		defer cancel()
		if err := a.store.Delete(ctx, eventKey(jobID)); err != nil && !errors.Is(err, fs.ErrNotExist) {
			a.logger.Warn("deleting a delivered webhook event", zap.String("id", jobID), zap.Error(err))
		}
		if l != nil {
			l.release(ctx)
		}
	}
	if why := p.startDelivery(jobID); why != "" {
		a.dropped(ev, why+"; left stored for the next look")
		if l != nil {
			a.requeueEnded(jobID, l)
		}
		return
	}
	go func() {
		defer p.deliveryDone(jobID)
		if !a.deliver(p.hooks, ev) && p.hooks.Err() != nil {
			return // cut off by a shutdown
		}
		finish()
	}()
}

// requeueEnded puts an ended job whose event is owed in the cluster's
// queue, for whichever instance looks next to deliver it, and lets it go.
func (a *asyncJobs) requeueEnded(jobID string, l *lease) {
	ctx, cancel := context.WithTimeout(context.Background(), storeTimeout)
	defer cancel()
	rec, err := a.store.loadJob(ctx, jobID)
	if err == nil {
		err = a.store.enqueue(ctx, rec)
	}
	if err != nil {
		// Held still: the instance that takes it over delivers it.
		a.logger.Warn("queuing the webhook event of an async batch", zap.String("id", jobID), zap.Error(err))
		return
	}
	a.pool.undelivered(jobID)
	l.release(ctx)
}

func (a *asyncJobs) dropped(ev *webhookEvent, why string) {
	a.metrics.webhooks.WithLabelValues("given_up").Inc()
	a.logger.Warn("webhook delivery not started", zap.String("event", ev.ID), zap.String("reason", why))
}

// deliver posts ev until it is delivered, attempts run out or ctx ends;
// it reports whether ev was delivered.
func (a *asyncJobs) deliver(ctx context.Context, ev *webhookEvent) bool {
	wh := a.cfg.Webhook
	wait := webhookBackoff
	for attempt := 1; ; attempt++ {
		status, err := wh.post(ctx, ev)
		if err == nil && status >= 200 && status < 300 {
			a.metrics.webhooks.WithLabelValues("delivered").Inc()
			a.logger.Debug("webhook delivered", zap.String("event", ev.ID), zap.Int("attempt", attempt))
			return true
		}
		a.metrics.webhooks.WithLabelValues("failed").Inc()
		if status >= 300 && status < 400 {
			a.logger.Warn("webhook receiver answered a redirect, which is not followed: a failed delivery",
				zap.String("event", ev.ID), zap.Int("status", status))
		}
		// Full jitter keeps many failed deliveries from retrying in step.
		if attempt == wh.MaxAttempts || ctx.Err() != nil || !sleepCtx(ctx, wait/2+rand.N(wait/2+1)) {
			a.metrics.webhooks.WithLabelValues("given_up").Inc()
			a.logger.Error("webhook delivery given up", zap.String("event", ev.ID), zap.Int("attempts", attempt),
				zap.Int("status", status), zap.Error(err), zap.Bool("canceled", ctx.Err() != nil))
			return false
		}
		wait = min(wait*2, 5*time.Minute)
	}
}

func (wh *Webhook) post(ctx context.Context, ev *webhookEvent) (int, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, wh.URL, bytes.NewReader(ev.Body))
	if err != nil {
		return 0, err
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Batch-Signature", sign(wh.Secret, now().Unix(), ev.Body))
	req.Header.Set("Batch-Event-Id", ev.ID)
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
