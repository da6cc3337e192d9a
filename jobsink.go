package batch

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/caddy-batch/batch/internal/jsontext"
	"go.uber.org/zap"
)

// checkpointEvery is how long results may wait in memory before they are
// stored with the part they belong to: what a crash makes another instance
// send again is what was in flight and what finished this long before it.
// It bounds a job's writes to twenty a second besides one per hundred
// results. A variable, so that tests may change it.
var checkpointEvery = 50 * time.Millisecond

// storeSink writes a job's results to storage in parts, and its record
// after each write: the record counts the results stored, which is where
// a resumed job goes on. Writes run beside the operations, one at a time:
// a job waits for storage only when storage falls behind. Once storage
// refuses a part, it stores nothing more, and the job skips the operations
// it has not started: their results could not be recorded.
type storeSink struct {
	j    *job
	rn   *runner
	ctx  context.Context // of writes: outlives the job's end
	stop context.Context // the job's: ends retries
	buf  []byte          // the results of the current part

	inBuf   int // results in buf
	written int // of them, those handed to a write
	n       int // results of the chunk so far, in its stored parts and buf
	chunk   int
	part    int // of the chunk, the one buf holds
	stored  int // results in storage, as of the last write waited for
	err     error
	enc     []byte // the result being put
	// halted is set at the first result a shutdown cut off, of a job that
	// is handed over: that operation runs again where the job resumes,
	// and what follows it too.
	halted bool

	// writing is the write in flight, if any, of flying: it reports the
	// results stored, or its error.
	writing chan written
	flying  []byte
	spare   []byte // a buffer for the next part

	lastWrite    time.Time
	lastProgress time.Time
	rate         rateMeter
}

type written struct {
	stored int
	err    error
}

// resume takes up where the stored record says the job is: the results it
// counts are stored, and those of the chunk they end in are read back into
// the part they end in.
func (s *storeSink) resume() error {
	rec := s.j.snapshot()
	s.stored = rec.Completed - rec.Unstored
	s.chunk, s.n = s.stored/resultsPerChunk, s.stored%resultsPerChunk
	s.lastWrite = now()
	s.rate.add(s.lastWrite, s.stored)
	for need := s.n; need > 0; s.part++ {
		buf, err := s.j.a.store.Load(s.stop, partKey(rec.ID, s.chunk, s.part))
		if err != nil {
			return fmt.Errorf("loading the results to resume from: chunk %d part %d: %w", s.chunk, s.part, err)
		}
		items := jsontext.SplitTop(buf)
		if len(items) < need {
			need -= len(items)
			continue
		}
		// The last part the record counts: it goes on in buf.
		for _, item := range items[:need] {
			if s.inBuf > 0 {
				s.buf = append(s.buf, ',')
			}
			s.buf = append(s.buf, item...)
			s.inBuf++
		}
		s.written = s.inBuf
		return nil
	}
	return nil
}

func (s *storeSink) put(_ int, op *operation, res *result) {
	// Once the lease is lost, another instance runs the job and records
	// it: nothing more is this one's to store.
	if s.halted || s.j.leaseLost() || res.cut && s.j.resumable() && errors.Is(context.Cause(s.stop), errInterrupted) {
		s.halted = true
		return
	}
	s.enc = appendResult(s.enc[:0], -1, op, res, s.rn.b.lean)
	enc := s.enc
	s.j.mu.Lock()
	s.j.rec.Completed++
	switch outcomeOf(res) {
	case outcomeSucceeded:
		s.j.rec.Succeeded++
	case outcomeSkipped:
		s.j.rec.Skipped++
		if res.unmet() {
			s.j.rec.Unmet++
		}
	default:
		s.j.rec.Failed++
	}
	s.j.rec.Stopped = s.rn.stoppedBy
	s.j.mu.Unlock()
	if len(s.writing) > 0 {
		s.wait() // done: a failure stops the job at once
	}
	if s.err != nil {
		return
	}
	if s.inBuf > 0 && len(s.buf)+1+len(enc) > partSize {
		if s.write(true); s.err != nil {
			return
		}
	}
	if s.inBuf > 0 {
		s.buf = append(s.buf, ',')
	}
	s.buf = append(s.buf, enc...)
	s.inBuf++
	s.n++
	switch {
	case s.n == resultsPerChunk:
		s.write(true)
		s.chunk, s.part, s.n = s.chunk+1, 0, 0
	case len(s.buf) >= partSize:
		s.write(true)
	case now().Sub(s.lastWrite) >= checkpointEvery:
		s.write(false)
	}
}

// write hands the results of buf not yet stored to a write of the current
// part, with the record as it stands; next then starts the next part.
func (s *storeSink) write(next bool) {
	if s.wait(); s.err != nil || s.j.leaseLost() {
		return
	}
	if s.inBuf > s.written {
		data := s.buf
		if next {
			s.buf = nil // the write holds it
		} else {
			data = append(s.spare[:0], s.buf...) // buf goes on filling
			s.spare = nil
		}
		key := partKey(s.j.rec.ID, s.chunk, s.part)
		rec := s.j.snapshot()
		s.writing, s.flying = make(chan written, 1), data
		go func(done chan<- written) {
			if s.j.leaseLost() {
				done <- written{stored: s.stored, err: errLeaseLost}
				return
			}
			err := s.store(key, data)
			if err == nil && !s.j.leaseLost() {
				if err := s.j.saveRecord(s.ctx, rec); err != nil {
					// Not fatal: the results are stored, and the end is retried.
					s.j.a.logger.Warn("storing async batch progress", zap.String("id", rec.ID), zap.Error(err))
				}
			}
			done <- written{stored: rec.Completed, err: err}
		}(s.writing)
		s.written = s.inBuf
		s.lastWrite = now()
		s.progress()
	}
	if next && s.inBuf > 0 {
		s.part++
		s.inBuf, s.written = 0, 0
		if s.buf == nil {
			s.buf, s.spare = s.spare[:0], nil
		} else {
			s.buf = s.buf[:0]
		}
	}
}

// wait waits for the write in flight, if any, and takes its buffer back.
func (s *storeSink) wait() {
	if s.writing == nil {
		return
	}
	w := <-s.writing
	if b := s.flying; cap(b) <= 2*partSize { // one large answer does not keep its buffer for the job's life
		if s.buf == nil {
			s.buf = b[:0]
		} else if s.spare == nil {
			s.spare = b[:0]
		}
	}
	s.writing, s.flying = nil, nil
	if w.err != nil {
		s.err = w.err
		why := "skipped: results could not be stored: " + w.err.Error()
		s.j.unrecorded.Store(&why)
		s.buf = nil
		return
	}
	s.stored = w.stored
}

// store writes a part, trying again while the job goes on.
func (s *storeSink) store(key string, val []byte) error {
	wait := storeRetry
	for attempt := 1; ; attempt++ {
		err := s.j.a.store.Store(s.ctx, key, val)
		if err == nil || attempt == storeAttempts || !sleepCtx(s.stop, wait) {
			return err
		}
		wait *= 2
	}
}

// progress measures how far the job is, and tells the webhook if asked.
func (s *storeSink) progress() {
	t := now()
	s.j.mu.Lock()
	completed := s.j.rec.Completed
	s.rate.add(t, completed)
	s.j.rec.UpdatedAt = &t
	if r := s.rate.perSecond(); r > 0 {
		eta := t.Add(time.Duration(float64(s.j.rec.Total-completed) / r * float64(time.Second)))
		s.j.rec.Rate, s.j.rec.EstimatedCompletionAt = r, &eta
	}
	s.j.mu.Unlock()
	if wh := s.j.a.cfg.Webhook; wh != nil && wh.wants("progress") && t.Sub(s.lastProgress) >= time.Duration(wh.ProgressInterval) {
		s.lastProgress = t
		s.j.a.notify(s.j.a.pool, "progress", s.j.snapshot().progress)
	}
}

// close stores what is left, and waits for it.
func (s *storeSink) close(summary) {
	s.write(true)
	s.wait()
}

// rateMeter measures a rate over the last minute from samples of a count.
type rateMeter struct {
	samples [16]struct {
		t time.Time
		n int
	}
	next, len int
}

const rateWindow = time.Minute

// add samples count n at t; samples closer than a sixteenth of the window
// to the last replace it.
func (m *rateMeter) add(t time.Time, n int) {
	if m.len > 1 {
		last := &m.samples[(m.next+len(m.samples)-1)%len(m.samples)]
		prev := m.samples[(m.next+len(m.samples)-2)%len(m.samples)]
		if t.Sub(prev.t) < rateWindow/time.Duration(len(m.samples)) {
			last.t, last.n = t, n
			return
		}
	}
	m.samples[m.next].t, m.samples[m.next].n = t, n
	m.next = (m.next + 1) % len(m.samples)
	m.len = min(m.len+1, len(m.samples))
}

// perSecond is the rate between the oldest sample of the last minute and
// the newest; 0 until they are a second apart.
func (m *rateMeter) perSecond() float64 {
	if m.len < 2 {
		return 0
	}
	newest := m.samples[(m.next+len(m.samples)-1)%len(m.samples)]
	for i := m.len; i > 1; i-- {
		old := m.samples[(m.next+len(m.samples)-i)%len(m.samples)]
		if d := newest.t.Sub(old.t); d <= rateWindow+rateWindow/8 {
			if d < time.Second {
				return 0
			}
			return float64(newest.n-old.n) / d.Seconds()
		}
	}
	return 0
}
