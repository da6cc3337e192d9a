package batch

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/caddy-batch/batch/internal/jsontext"
	"github.com/tidwall/gjson"
	"go.uber.org/zap"
)

// checkpointEvery is how long results may wait in memory before they are
// stored with the part they belong to: what a crash makes another instance
// send again is what was in flight and what finished this long before it.
// It bounds a job's writes to twenty a second besides one per hundred
// results. A variable, so that tests may change it.
var checkpointEvery = 50 * time.Millisecond

// storeSink writes a job's results to storage in parts, and its record
// after them: the record counts the results stored, which is where a
// resumed job goes on. Writes run behind the operations, several parts at
// once (a storage a network away answers each in milliseconds), the record
// after the parts it counts: a job waits for storage only when storage
// falls behind by maxWrites parts. Once storage refuses a part, nothing
// more is stored, and the job skips the operations it has not started:
// their results could not be recorded.
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
	stored  int // results in storage when the job ended (close)
	err     error
	enc     []byte // the result being put
	// halted is set at the first result a shutdown cut off, of a job that
	// is handed over: that operation runs again where the job resumes,
	// and what follows it too.
	halted bool

	w *sinkWriter

	// The failures stream: failed and skipped results, each with its
	// index and request, in parts of their own (see failureIndex).
	keepFailures bool
	fails        []byte // the entries of the current part
	fenc         []byte // the entry being put
	inFails      int    // entries in fails
	failsWritten int    // of them, those handed to a write
	failPart     int

	// mu serializes put with the idle flush.
	mu        sync.Mutex
	stopFlush chan struct{}
	flushDone chan struct{}

	lastWrite    time.Time
	lastProgress time.Time
	rate         rateMeter
}

// failuresPerPart bounds the entries of a part of the failures stream, as
// resultsPerChunk bounds those of a chunk of results: a reader seeking an
// index reads at most this many entries before it.
const failuresPerPart = 1000

// idleFlush is how often a job that puts no result checks for results
// that wait in memory: a result is readable within about this long after
// it is final, however slowly the next one comes.
const idleFlush = 250 * time.Millisecond

// maxWrites bounds the parts of one job being stored at once, and so the
// memory they hold: a part is at most partSize.
const maxWrites = 4

// resume takes up where the stored record says the job is: the results it
// counts are stored, and those of the chunk they end in are read back into
// the part they end in.
func (s *storeSink) resume() error {
	rec := s.j.snapshot()
	s.stored = rec.Completed - rec.Unstored
	s.chunk, s.n = s.stored/resultsPerChunk, s.stored%resultsPerChunk
	s.lastWrite = now()
	s.rate.add(s.lastWrite, s.stored)
	s.w = newSinkWriter(s, s.stored)
	s.j.readable.Store(&rec)
	if s.stored < 0 || s.stored > rec.Total {
		return fmt.Errorf("%w: %d results stored of %d operations", errBadRecord, s.stored, rec.Total)
	}
	if err := s.resumeFailures(rec); err != nil {
		return err
	}
	if err := s.resumePart(rec); err != nil {
		return err
	}
	// Once the part is read back: the flusher writes what s.buf holds.
	s.stopFlush, s.flushDone = make(chan struct{}), make(chan struct{})
	go s.flushIdle()
	return nil
}

// resumePart reads back into s.buf the results of the part the stored
// ones end in.
func (s *storeSink) resumePart(rec jobRecord) error {
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
			s.buf = appendItem(s.buf, s.inBuf, item)
			s.inBuf++
		}
		s.written = s.inBuf
		return nil
	}
	return nil
}

// noteStop records in the job's record what res says stopped the job: the
// failure budget, or the window. j.mu is held.
func (j *job) noteStop(res *result) {
	switch res.err {
	case errBudgetExhausted:
		if j.rec.StopReason == "" {
			j.rec.StopReason = stopFailureBudget
		}
	case errWindowSkip, errWindowCut:
		j.rec.WindowPassed = true
	}
}

// resumeFailures takes up the failures stream where the stored record
// says the job is: a job that starts keeps one; of the last part, the
// entries the record counts are read back into fails.
func (s *storeSink) resumeFailures(rec jobRecord) error {
	if s.stored == 0 {
		s.j.mu.Lock()
		s.j.rec.Failures = failureIndex{Kept: true, Sealed: s.j.spec.SealedOps}
		s.j.mu.Unlock()
		s.keepFailures = true
		return nil
	}
	if s.keepFailures = rec.Failures.Kept; !s.keepFailures || len(rec.Failures.Starts) == 0 {
		return nil
	}
	s.failPart = len(rec.Failures.Starts) - 1
	items, err := s.j.a.store.failurePart(s.stop, rec, s.failPart)
	if err != nil {
		return fmt.Errorf("loading the failures to resume from: part %d: %w", s.failPart, err)
	}
	for _, item := range items {
		if int(gjson.GetBytes(item, "index").Int()) >= s.stored {
			break // stored after the record: its operation runs again
		}
		s.fails = appendItem(s.fails, s.inFails, item)
		s.inFails++
	}
	s.failsWritten = s.inFails
	return nil
}

func (s *storeSink) put(_ int, op *operation, res *result) {
	s.mu.Lock()
	defer s.mu.Unlock()
	// Once the lease is lost, another instance runs the job and records
	// it: nothing more is this one's to store.
	if s.halted || s.j.leaseLost() || res.cut && s.j.resumable() && errors.Is(context.Cause(s.stop), errInterrupted) {
		s.halted = true
		return
	}
	s.enc = appendResult(s.enc[:0], -1, op, res, s.rn.b.lean)
	enc := s.enc
	outcome := outcomeOf(res)
	s.j.mu.Lock()
	index := s.j.rec.Completed
	s.j.rec.Completed++
	switch outcome {
	case outcomeSucceeded:
		s.j.rec.Succeeded++
	case outcomeSkipped:
		s.j.rec.Skipped++
		if res.unmet() {
			s.j.rec.Unmet++
		}
	default:
		s.j.rec.Failed++
		if op.tested {
			s.j.rec.Tested++
		}
	}
	s.j.rec.Stopped = s.rn.stoppedBy
	s.j.noteStop(res)
	s.j.mu.Unlock()
	if s.failed() {
		return
	}
	if outcome != outcomeSucceeded && s.keepFailures {
		s.keepFailure(index, outcome, op, enc)
	}
	if s.inBuf > 0 && len(s.buf)+1+len(enc) > partSize {
		if s.write(true); s.err != nil {
			return
		}
	}
	s.buf = appendItem(s.buf, s.inBuf, enc)
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

// appendItem appends item to the items of a part, n of them before it.
func appendItem(buf []byte, n int, item []byte) []byte {
	if n > 0 {
		buf = append(buf, ',')
	}
	return append(buf, item...)
}

// keepFailure adds a failed or skipped result to the failures stream,
// with its index and the request that made it.
func (s *storeSink) keepFailure(index, outcome int, op *operation, enc []byte) {
	e := strconv.AppendInt(append(s.fenc[:0], `{"index":`...), int64(index), 10)
	e = append(append(append(e, `,"outcome":"`...), outcomeNames[outcome]...), `","result":`...)
	e = appendRequest(append(append(e, enc...), `,"request":`...), op, s.rn.b.ops)
	e = append(e, '}')
	s.fenc = e
	if s.inFails > 0 && (s.inFails == failuresPerPart || len(s.fails)+1+len(e) > partSize) {
		if s.writeFailures(true); s.err != nil {
			return
		}
	}
	if s.inFails == 0 {
		s.j.mu.Lock()
		s.j.rec.Failures.Starts = append(s.j.rec.Failures.Starts, index)
		s.j.mu.Unlock()
	}
	s.fails = appendItem(s.fails, s.inFails, e)
	s.inFails++
}

// appendRequest appends op as its batch submitted it, in the native form:
// what a client reads to fix and resend it, and what a rerun runs again.
// Its own headers only, never those it inherited from the batch request;
// its references and condition as written.
func appendRequest(dst []byte, op *operation, ops []*operation) []byte {
	dst = append(dst, '{')
	if !op.isRollback { // a rollback has no id of its own
		dst = jsontext.AppendString(append(dst, `"id":`...), op.id)
		dst = append(dst, ',')
	}
	dst = jsontext.AppendString(append(dst, `"method":`...), op.method)
	dst = jsontext.AppendString(append(dst, `,"path":`...), op.target)
	if len(op.header) > 0 {
		dst = appendRequestHeaders(append(dst, `,"headers":{`...), op.header)
	}
	switch body := op.body; {
	case body == nil:
	case isJSONType(contentType(op.header)) && nativeJSONBody(body):
		dst = append(append(dst, `,"body":`...), bytes.TrimSpace(body)...)
	case utf8.Valid(body):
		dst = jsontext.AppendString(append(dst, `,"body":`...), string(body))
	default:
		dst = base64.StdEncoding.AppendEncode(append(dst, `,"body":"`...), body)
		dst = append(dst, `","body_encoding":"base64"`...)
	}
	if len(op.deps) > 0 {
		dst = append(dst, `,"depends_on":[`...)
		for k, d := range op.deps {
			if k > 0 {
				dst = append(dst, ',')
			}
			if d < len(ops) {
				dst = jsontext.AppendString(dst, ops[d].id)
			}
		}
		dst = append(dst, ']')
	}
	if op.cond != nil {
		dst = jsontext.AppendString(append(dst, `,"if":`...), op.cond.String())
	}
	if op.key != "" {
		dst = jsontext.AppendString(append(dst, `,"key":`...), op.key)
	}
	if op.rollback != nil {
		dst = appendRequest(append(dst, `,"rollback":`...), op.rollback, ops)
	}
	return append(dst, '}')
}

// appendRequestHeaders appends the fields of a request's headers, names
// sorted, a value given several times as an array, as it was submitted:
// joined, a header such as Cookie would not be the same.
func appendRequestHeaders(dst []byte, h http.Header) []byte {
	var arr [16]string
	for i, name := range sortedNames(arr[:0], h) {
		if i > 0 {
			dst = append(dst, ',')
		}
		dst = append(jsontext.AppendString(dst, name), ':')
		if v := h[name]; len(v) == 1 {
			dst = jsontext.AppendString(dst, v[0])
			continue
		}
		for k, v := range h[name] {
			dst = append(dst, "[,"[min(k, 1)])
			dst = jsontext.AppendString(dst, v)
		}
		dst = append(dst, ']')
	}
	return append(dst, '}')
}

// nativeJSONBody reports whether body, sent as JSON, is written as that
// JSON value in a native request: not a string, which the native form
// sends as its text, nor null, which it sends as no body.
func nativeJSONBody(body []byte) bool {
	t := bytes.TrimSpace(body)
	return len(t) > 0 && t[0] != '"' && t[0] != 'n' && jsontext.Valid(t, maxJSONDepth)
}

// writeFailures hands the entries of the failures stream not yet stored
// to a write of their part, which counts no result: the write of results
// after it carries the record. next then starts the next part.
func (s *storeSink) writeFailures(next bool) {
	if s.failed() || s.j.leaseLost() {
		return
	}
	if s.inFails > s.failsWritten {
		data := s.fails
		if next {
			s.fails = nil // the write holds it
		} else {
			data = slices.Clone(s.fails)
		}
		key := failureKey(s.j.rec.ID, s.failPart)
		if s.j.spec.SealedOps { // entries hold requests, and so their headers
			data = s.j.a.store.sealer.Seal(key, data)
		}
		s.w.write(key, data, nil)
		s.failsWritten = s.inFails
	}
	if next && s.inFails > 0 {
		s.failPart++
		s.inFails, s.failsWritten = 0, 0
		s.fails = s.fails[:0]
	}
}

// flushIdle writes, every idleFlush, results that wait in memory while no
// further result comes (a paced job): readers see them.
func (s *storeSink) flushIdle() {
	defer close(s.flushDone)
	t := time.NewTicker(idleFlush)
	defer t.Stop()
	for {
		select {
		case <-s.stopFlush:
			return
		case <-t.C:
		}
		s.mu.Lock()
		if !s.halted && (s.inBuf > s.written || s.inFails > s.failsWritten) && now().Sub(s.lastWrite) >= checkpointEvery {
			s.write(false)
		}
		s.mu.Unlock()
	}
}

// failed reports whether storage refused a part: the job then stops.
func (s *storeSink) failed() bool {
	if s.err == nil {
		s.err = s.w.failure()
		if s.err != nil {
			why := "skipped: results could not be stored: " + s.err.Error()
			s.j.unrecorded.Store(&why)
			s.buf = nil
		}
	}
	return s.err != nil
}

// write hands the results of buf not yet stored to a write of the current
// part, with the record as it stands; next then starts the next part.
func (s *storeSink) write(next bool) {
	if s.failed() || s.j.leaseLost() {
		return
	}
	// The failures of the results written first: the record after both
	// counts no result whose failure entry is not stored.
	s.writeFailures(false)
	if s.inBuf > s.written {
		data := s.buf
		if next {
			s.buf = nil // the write holds it
		} else {
			data = slices.Clone(s.buf) // buf goes on filling
		}
		rec := s.j.snapshot()
		s.w.write(partKey(s.j.rec.ID, s.chunk, s.part), data, &rec)
		s.written = s.inBuf
		s.lastWrite = now()
		s.progress()
	}
	if next && s.inBuf > 0 {
		s.part++
		s.inBuf, s.written = 0, 0
		s.buf = s.buf[:0]
	}
}

// sinkWriter stores a job's parts of results, several at once but one
// write of a part at a time, and after them the job's record counting
// them: a record never counts a result that is not stored.
type sinkWriter struct {
	s     *storeSink
	parts chan *partWrite // to store, in the order they were written
	ended chan struct{}   // the writer has stored what it was given

	mu     sync.Mutex
	err    error      // the first part storage refused, once it has
	broken bool       // a part before the next to settle was refused
	stored int        // results counted by the last record to store
	rec    *jobRecord // the record to store next, nil when none
	recNew chan struct{}
	recEnd chan struct{}
}

type partWrite struct {
	key  string
	data []byte
	rec  *jobRecord // as it stood when the part was written; nil: it counts no result
	err  error
	done chan struct{}
}

func newSinkWriter(s *storeSink, stored int) *sinkWriter {
	w := &sinkWriter{s: s, parts: make(chan *partWrite, maxWrites), ended: make(chan struct{}),
		stored: stored, recNew: make(chan struct{}, 1), recEnd: make(chan struct{})}
	go w.storeParts()
	go w.storeRecords()
	return w
}

// write queues a part and the record that counts it; it waits only when
// maxWrites parts are queued already.
func (w *sinkWriter) write(key string, data []byte, rec *jobRecord) {
	w.parts <- &partWrite{key: key, data: data, rec: rec, done: make(chan struct{})}
}

// failure is the error storage refused a part with, if it has.
func (w *sinkWriter) failure() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.err
}

// storeParts stores the parts queued, at most maxWrites at once; a part
// written again (a checkpoint, then the part it grew into) waits for the
// writes of it before. As the oldest writes end, in order, their records are
// handed to storeRecords.
func (w *sinkWriter) storeParts() {
	defer close(w.ended)
	var inFlight []*partWrite
	settle := func() { // the oldest write, waited for
		pw := inFlight[0]
		inFlight = inFlight[1:]
		<-pw.done
		w.mu.Lock()
		if pw.err != nil {
			w.broken = true
		}
		if !w.broken && pw.rec != nil { // a record counts no result after one not stored
			w.rec, w.stored = pw.rec, pw.rec.Completed
			w.s.j.readable.Store(pw.rec)
		}
		w.mu.Unlock()
		select {
		case w.recNew <- struct{}{}:
		default:
		}
	}
	for {
		// The oldest write settles as soon as it ends: its record, and
		// the results it makes readable, do not wait for the next write.
		var oldest chan struct{}
		if len(inFlight) > 0 {
			oldest = inFlight[0].done
		}
		var pw *partWrite
		select {
		case <-oldest:
			settle()
			continue
		case pw = <-w.parts:
		}
		if pw == nil {
			break // closed
		}
		for len(inFlight) == maxWrites || slices.ContainsFunc(inFlight, func(f *partWrite) bool { return f.key == pw.key }) {
			settle()
		}
		if w.failure() != nil {
			close(pw.done)
			continue // nothing more is stored
		}
		inFlight = append(inFlight, pw)
		go func() {
			defer close(pw.done)
			if w.s.j.leaseLost() {
				pw.err = errLeaseLost
				return
			}
			if pw.err = w.s.store(pw.key, pw.data); pw.err != nil {
				w.mu.Lock()
				if w.err == nil {
					w.err = pw.err // the job stops at its next operation
				}
				w.mu.Unlock()
			}
		}()
	}
	for len(inFlight) > 0 {
		settle()
	}
	close(w.recNew)
}

// storeRecords stores the newest record handed to it, one at a time:
// records that came while one was stored are counted by the next.
func (w *sinkWriter) storeRecords() {
	defer close(w.recEnd)
	for range w.recNew {
		w.mu.Lock()
		rec := w.rec
		w.rec = nil
		w.mu.Unlock()
		if rec == nil || w.s.j.leaseLost() {
			continue
		}
		if err := w.s.j.saveRecord(w.s.ctx, *rec); err != nil {
			// Not fatal: the results are stored, and the end is retried.
			w.s.j.a.logger.Warn("storing async batch progress", zap.String("id", rec.ID), zap.Error(err))
		}
	}
}

// close waits for every part and record queued to be stored.
func (w *sinkWriter) close() (stored int, err error) {
	close(w.parts)
	<-w.ended
	<-w.recEnd
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.stored, w.err
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
	if s.stopFlush != nil {
		close(s.stopFlush)
		<-s.flushDone
	}
	s.write(true)
	stored, err := s.w.close()
	s.stored = stored
	if s.err == nil {
		s.err = err
	}
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
