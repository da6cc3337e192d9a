package batch

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io/fs"
	"path"
	"time"

	"go.uber.org/zap"
)

// Instances sharing a storage pace one owner's operations to one API
// together: every second each tells, for each owner and API it sends to,
// how much the API took from it and until when it was told to pause, and
// reads what the others told. Each then takes its share of the owner's
// quota, instead of what it alone was left of it. Storage traffic, per
// instance and per owner and API sent to in the last seconds: a write, a
// list, and a read per other instance sending to it, each second.

const pacePrefix = "batch/pace"

// paceEvery is how often pacers tell each other what they learned.
var paceEvery = time.Second

// paceRecord is what an instance tells of one of its pacers.
type paceRecord struct {
	Accepted    float64   `json:"accepted"` // answers the API took a second
	PausedUntil time.Time `json:"paused_until,omitzero"`
	At          time.Time `json:"at"`
}

// processID names this process in the pacing records it stores.
var processID = newBatchID()

// paceKeyPath is where the records of pacer key are: the key holds an
// owner's hash and a host, kept hashed again.
func paceKeyPath(key string) string {
	sum := sha256.Sum256([]byte(key))
	return path.Join(pacePrefix, hex.EncodeToString(sum[:16]))
}

// sharePacing tells and reads what pacers learned until ctx ends.
func (h *Handler) sharePacing(ctx context.Context) {
	tick := time.NewTicker(paceEvery)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-tick.C:
		}
		for _, l := range h.gate.Active() {
			if ctx.Err() != nil {
				return
			}
			h.sharePacer(ctx, l.Key, paceRecord{Accepted: l.Accepted, PausedUntil: l.PausedUntil, At: now()})
		}
	}
}

// sharePacer stores what this instance's pacer key learned, and gives
// the pacer what the others sending as its owner to its API told.
func (h *Handler) sharePacer(ctx context.Context, key string, mine paceRecord) {
	dir := paceKeyPath(key)
	buf, _ := json.Marshal(mine)
	if err := h.storage.Store(ctx, path.Join(dir, processID), buf); err != nil {
		h.logger.Debug("sharing what pacing learned", zap.Error(err))
		return
	}
	names, err := h.storage.List(ctx, dir, false)
	if err != nil {
		return
	}
	var count int
	var accepted float64
	var paused time.Time
	for _, name := range names {
		if path.Base(name) == processID {
			continue
		}
		buf, err := h.storage.Load(ctx, name)
		var r paceRecord
		if err != nil || json.Unmarshal(buf, &r) != nil || now().Sub(r.At) > 3*paceEvery {
			continue // gone quiet, or not readable: not a peer now
		}
		count++
		accepted += min(max(r.Accepted, 0), 1e6) // what a peer tells is bounded as the pacer is
		if r.PausedUntil.After(paused) {
			paused = r.PausedUntil
		}
	}
	if most := now().Add(time.Minute); paused.After(most) {
		paused = most // as long as one answer may pause, at most
	}
	h.gate.SetPeers(key, count, accepted, paused)
}

// sweepPacing deletes the pacing records no instance has told for a
// minute.
func (h *Handler) sweepPacing(ctx context.Context) {
	dirs, err := h.storage.List(ctx, pacePrefix, false)
	if err != nil {
		return
	}
	for _, dir := range dirs {
		names, err := h.storage.List(ctx, dir, false)
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			continue
		}
		for _, name := range names {
			if info, err := h.storage.Stat(ctx, name); err == nil && now().Sub(info.Modified) > time.Minute {
				_ = h.storage.Delete(ctx, name)
			}
		}
		if len(names) == 0 {
			_ = h.storage.Delete(ctx, dir)
		}
	}
}
