package batch

import (
	"bufio"
	"bytes"
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"hash"
	"hash/fnv"
	"io"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/caddy-batch/batch/internal/jsontext"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/tidwall/gjson"
)

// An async batch too large to hold (more than max_ops operations, a body
// over max_body_size, or NDJSON) is streamed into storage as it is read:
// each operation is validated and appended to a chunk, and each chunk
// stored once full, so that memory holds one chunk and one operation
// whatever the body's size. Nothing is queued, and everything stored is
// deleted, unless the whole body is valid. Its operations must stand
// alone: what would need the whole batch in memory (depends_on,
// references, rollbacks, all_or_nothing, atomicity groups) is refused.

// streamed answers a streamed async batch: prefix is what was read of
// its body, and rest what remains to read.
func (a *asyncJobs) submitStreamed(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler, prefix []byte, rest io.Reader, form string) error {
	key := r.Header.Get("Idempotency-Key")
	if len(key) > maxIdempotencyKey {
		return writeError(w, http.StatusBadRequest, fmt.Sprintf("Idempotency-Key must be at most %d characters", maxIdempotencyKey))
	}
	if !a.pool.hasQueueRoom() {
		return writeRefusal(w, &batch{format: native}, errQueueFull) // read nothing that cannot be queued
	}
	j, err := a.newJob(w, r, next, native)
	if j == nil {
		return writeRefusal(w, &batch{format: native}, err)
	}
	in := newIntake(a, j, r)
	sum := sha256.New()
	limit := a.cfg.MaxBodySize - int64(len(prefix))
	rc := http.NewResponseController(w)
	rest = &idleReader{r: rest, rc: rc}
	defer func() { _ = rc.SetReadDeadline(time.Time{}) }() // the connection's next request has its own
	body := io.MultiReader(bytes.NewReader(prefix), http.MaxBytesReader(w, io.NopCloser(rest), max(limit, 0)))
	err = in.read(io.TeeReader(body, sum), form)
	if err == nil {
		err = in.finish()
	}
	if err != nil {
		_ = in.stored() // what is dropped must have landed
		_ = j.drop(nil)
		return in.refuse(w, r, err)
	}
	queue := func(w http.ResponseWriter, status func() int) (bool, error) {
		err := a.queueJob(w, r, j, in.n)
		return status() == http.StatusAccepted, err
	}
	if key == "" {
		_, err := queue(w, func() int { return http.StatusAccepted })
		return writeRefusal(w, &batch{format: native}, err)
	}
	queued := false
	err = a.h.serveOnce(w, r, native, key, hex.EncodeToString(sum.Sum(nil)), func(w http.ResponseWriter, status func() int) (bool, error) {
		queued = true
		return queue(w, status)
	})
	if !queued {
		_ = j.drop(nil) // answered from the key: this body is not a job
	}
	return writeRefusal(w, &batch{format: native}, err)
}

// idleReader reads a body that must not stall: each read has intakeIdle
// to bring something, or the intake ends (408).
type idleReader struct {
	r  io.Reader
	rc *http.ResponseController
}

// intakeIdle is how long an upload may send nothing; a variable, so that
// tests may shorten it.
var intakeIdle = time.Minute

func (ir *idleReader) Read(p []byte) (int, error) {
	_ = ir.rc.SetReadDeadline(time.Now().Add(intakeIdle)) // where the writer cannot, the server's own timeouts hold
	return ir.r.Read(p)
}

// intake validates a streamed batch and stores its operations in chunks.
type intake struct {
	a   *asyncJobs
	j   *job
	ctx context.Context
	lim rules
	p   parser

	chunk   []byte // a JSON array being filled
	inChunk int
	// writes holds a token per chunk being stored; err is the first
	// write's that failed.
	writes  chan struct{}
	wg      sync.WaitGroup
	mu      sync.Mutex
	err     error
	first   int // index of the chunk's first operation
	n       int // operations (or items) read
	tooMany bool
	// ids holds a hash of each id given, with its operation, and named
	// marks the operations that give one: duplicates are found at the end
	// in memory linear in the count, not in the ids' size.
	ids   []idAt
	named []uint64
	// numeric holds the ids that are numbers, with their operations: each
	// is another operation's default id unless that one names itself.
	numeric []idAt
	fnv     hash.Hash64

	shape     string
	bulkOp    *operation // the operation of a bulk batch
	encoding  gjson.Result
	headerFor map[string]http.Header // of the items' operations, by Content-Type
	line      int                    // of NDJSON or CSV
	query     url.Values             // of the request: a CSV batch's operation
}

type idAt struct {
	hash        uint64
	index, line int32 // line of NDJSON, 0 for JSON
}

func newIntake(a *asyncJobs, j *job, r *http.Request) *intake {
	in := &intake{a: a, j: j, ctx: r.Context(), lim: a.h.rules, writes: make(chan struct{}, chunkWrites), shape: shapeOps, fnv: fnv.New64a(),
		headerFor: map[string]http.Header{}}
	in.lim.maxOps = a.cfg.MaxOps
	in.lim.sources = j.spec.RetryOf != ""
	in.p = parser{lim: &in.lim, ctx: r.Context()}
	in.chunk = append(make([]byte, 0, 64<<10), '[')
	q := r.URL.Query()
	in.query = q
	if isCSV(r.Header.Get("Content-Type")) {
		return in // its query is its operation and options: readCSV reads it whole
	}
	for _, name := range []string{"mode", "atomicity", "omit_response_on_success", "include_headers", "max_attempts", "key_concurrency",
		"max_failures", "max_failure_rate"} {
		vs := q[name]
		if len(vs) > 1 {
			in.fault("query parameter %q given twice", short(name))
			continue
		}
		if len(vs) == 1 && vs[0] != "" {
			// A number or a boolean as such, anything else as the string
			// it is: "50,000" is refused, not read as 50.
			raw := vs[0]
			if name == "mode" || name == "atomicity" || !gjson.Valid(raw) {
				raw = strconv.Quote(raw)
			}
			in.option(name, gjson.Parse(raw))
		}
	}
	md, msg := queryMetadata(q)
	if msg != "" {
		in.fault("%s", msg)
	}
	j.rec.Metadata = md
	return in
}

// fault records a fault of the batch as a whole.
func (in *intake) fault(format string, args ...any) { in.p.batchFault(format, args...) }

// Forms of a streamed body.
const (
	streamJSON   = "json"
	streamNDJSON = "ndjson"
	streamCSV    = "csv"
)

// read reads the body, JSON, NDJSON or CSV.
func (in *intake) read(body io.Reader, form string) error {
	br := bufio.NewReaderSize(body, 64<<10)
	switch form {
	case streamNDJSON:
		return in.readLines(br)
	case streamCSV:
		return in.readCSV(br)
	}
	return in.readJSON(&jsonStream{r: br, max: in.a.h.MaxBodySize})
}

// readCSV reads a CSV body: a bulk batch whose operation the query gives,
// each row an item, its faults named by line.
func (in *intake) readCSV(body io.Reader) error {
	op, opts, faults := csvTemplate(in.query)
	for _, f := range faults {
		in.fault("%s", f.Message)
	}
	gjson.ParseBytes(opts).ForEach(func(k, v gjson.Result) bool {
		in.option(k.Str, v)
		return true
	})
	in.bulkOperation(op)
	lim := csvLimits{maxRecord: in.a.h.MaxBodySize, maxTotal: 4 * in.a.cfg.MaxBodySize}
	_, err := readCSVItems(body, lim, func(line int, obj []byte) bool {
		in.line = line
		in.addItem(obj)
		return !in.tooMany
	}, func(line int, msg string) bool {
		in.fault("line %d: %s", line, msg)
		return len(in.p.faults) < maxFaults
	})
	return err
}

// readLines reads NDJSON: one operation per line; the first line may hold
// the batch's options instead.
func (in *intake) readLines(br *bufio.Reader) error {
	var line []byte
	for in.line = 1; ; in.line++ {
		var err error
		line, err = readLine(br, line[:0], in.a.h.MaxBodySize)
		if err != nil && !(errors.Is(err, io.EOF) && len(line) > 0) {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		}
		if t := bytes.TrimSpace(line); len(t) > 0 {
			if in.line == 1 && in.options(t) {
				continue
			}
			in.addOp(t)
			if in.tooMany {
				return nil
			}
		}
		if err != nil {
			return nil // the last line, without a newline
		}
		if in.n%256 == 0 && in.ctx.Err() != nil {
			return in.ctx.Err()
		}
	}
}

// errLineTooLong is a line longer than max_body_size: no operation is.
var errLineTooLong = errors.New("line too long")

// readLine appends a line of br to dst, without its newline.
func readLine(br *bufio.Reader, dst []byte, limit int64) ([]byte, error) {
	for {
		frag, err := br.ReadSlice('\n')
		if int64(len(dst)+len(frag)) > limit+1 {
			return dst, errLineTooLong
		}
		dst = append(dst, frag...)
		switch {
		case err == nil:
			return dst[:len(dst)-1], nil
		case !errors.Is(err, bufio.ErrBufferFull):
			return dst, err
		}
	}
}

// options takes the batch options of a first NDJSON line, if it holds
// nothing else.
func (in *intake) options(line []byte) bool {
	v := gjson.ParseBytes(line)
	if !v.IsObject() || !gjson.ValidBytes(line) {
		return false
	}
	only := true
	v.ForEach(func(k, _ gjson.Result) bool {
		switch k.String() {
		case "mode", "atomicity", "omit_response_on_success", "include_headers", "async", "max_attempts", "key_concurrency",
			"max_failures", "max_failure_rate", "metadata":
		default:
			only = false
		}
		return only
	})
	if !only {
		return false
	}
	v.ForEach(func(k, val gjson.Result) bool {
		in.option(k.String(), val)
		return true
	})
	return true
}

// option takes one batch option.
func (in *intake) option(name string, v gjson.Result) {
	spec := in.j.spec
	switch name {
	case "mode":
		switch s := v.String(); {
		case v.Type == gjson.String && (s == modeSequential || s == modeParallel):
			spec.Mode = s
		default:
			in.fault("mode must be \"sequential\" or \"parallel\", got %s", short(v.Raw))
		}
	case "atomicity":
		switch s := v.String(); {
		case v.Type == gjson.String && (s == atomicNone || s == atomicStopOnError):
			spec.Atomicity = s
		case s == atomicAllOrNothing:
			in.fault("atomicity all_or_nothing needs the whole batch in memory: a streamed job takes none or stop_on_error")
		default:
			in.fault("atomicity must be \"none\" or \"stop_on_error\", got %s", short(v.Raw))
		}
	case "max_attempts":
		spec.MaxAttempts = in.p.maxAttempts(v)
	case "key_concurrency":
		spec.KeyConcurrency = in.p.keyConcurrency(v)
	case "max_failures", "max_failure_rate":
		var b batch
		in.p.budgetField(&b, name, v)
		spec.MaxFailures = cmp.Or(b.maxFailures, spec.MaxFailures)
		spec.MaxFailureRate = cmp.Or(b.maxFailureRate, spec.MaxFailureRate)
	case "metadata":
		if in.j.rec.Metadata != nil {
			in.fault("metadata is given in the query already")
			return
		}
		var b batch
		in.p.metadataField(&b, v)
		in.j.rec.Metadata = b.metadata
	case "async", "omit_response_on_success", "include_headers", "dry_run":
		if !v.IsBool() {
			in.fault("%s must be true or false, got %s", name, short(v.Raw))
			return
		}
		switch name {
		case "omit_response_on_success":
			spec.OmitSuccess = v.Bool()
		case "include_headers":
			spec.NoHeaders = !v.Bool()
		case "dry_run":
			if v.Bool() {
				in.fault("dry_run takes a batch of at most max_ops operations (%d)", in.a.h.MaxOps)
			}
		}
	default:
		in.fault("unknown field %q", short(name))
	}
}

// addOp validates an operation and stores it with the next chunk.
func (in *intake) addOp(raw []byte) {
	in.add(raw, "operation", "", func(i int, v gjson.Result) {
		op := in.p.parseOperation(i, v, kindOp)
		switch {
		case len(op.depIDs) > 0:
			in.p.opFault(op, "depends_on needs the whole batch in memory: a streamed job takes operations that stand alone")
		case op.refs != nil:
			in.p.opFault(op, "references need the whole batch in memory: a streamed job takes operations that stand alone")
		case op.cond != nil:
			in.p.opFault(op, "if needs the whole batch in memory: a streamed job takes operations that stand alone")
		case op.rollback != nil:
			in.p.opFault(op, "rollback needs atomicity all_or_nothing, which a streamed job does not take")
		}
		in.noCredentials(op)
		if op.id != strconv.Itoa(i) {
			in.noteID(i, op.id)
		}
	})
}

// noCredentials refuses an operation whose headers may carry a credential
// when storage would hold it in clear.
func (in *intake) noCredentials(op *operation) {
	if in.a.store.sealer != nil {
		return
	}
	for name := range op.header {
		if credentialHeader(name) {
			in.p.opFault(op, "%s", credentialFault(name))
		}
	}
}

// addItem validates an item of a bulk batch, and the operation it makes,
// and stores it with the next chunk.
func (in *intake) addItem(raw []byte) {
	if in.startsChunk(raw) {
		in.p.resetItemBudget() // each chunk runs as a batch of its own
	}
	in.add(raw, "item", "item: ", func(i int, v gjson.Result) {
		if in.bulkOp == nil {
			in.p.parseBody(&operation{index: i, id: strconv.Itoa(i)}, v, in.encoding)
			return
		}
		var op operation
		in.p.fillItem(&op, i, in.bulkOp, v, in.encoding, in.headerFor)
	})
}

// startsChunk reports whether raw goes into a chunk of its own, as append
// decides.
func (in *intake) startsChunk(raw []byte) bool {
	return in.inChunk > 0 && (in.inChunk == opsPerChunk || len(in.chunk)+len(raw) > opsChunkSize)
}

// add counts raw as operation in.n, checks it is JSON that fits the
// limits (its faults named for what, after prefix), validates it with
// parse, and stores it with the next chunk.
func (in *intake) add(raw []byte, what, prefix string, parse func(i int, v gjson.Result)) {
	i := in.n
	if in.n++; in.n > in.lim.maxOps {
		in.tooMany = true
		return
	}
	before := len(in.p.faults)
	defer in.locate(before)
	if problem, _ := jsontext.Check(raw, maxJSONDepth); problem != "" {
		in.p.opFault(&operation{index: i, id: strconv.Itoa(i)}, "%s%s %s", prefix, what, problem)
		return
	}
	parse(i, gjson.ParseBytes(raw))
	in.append(raw)
}

// noteID records the id of operation i, which is not its default one, to
// find duplicates once the body is read: a hash, not the id, so that
// memory grows by 16 bytes per operation whatever the ids' size.
func (in *intake) noteID(i int, id string) {
	in.fnv.Reset()
	_, _ = io.WriteString(in.fnv, id)
	in.ids = append(in.ids, idAt{in.fnv.Sum64(), int32(i), int32(in.line)})
	for len(in.named) <= i/64 {
		in.named = append(in.named, 0)
	}
	in.named[i/64] |= 1 << (i % 64)
	if k, err := strconv.Atoi(id); err == nil && k >= 0 && strconv.Itoa(k) == id {
		in.numeric = append(in.numeric, idAt{uint64(k), int32(i), int32(in.line)})
	}
}

// locate puts the line of NDJSON in front of the faults found since
// before.
func (in *intake) locate(before int) {
	if in.line == 0 {
		return
	}
	for k := before; k < len(in.p.faults); k++ {
		in.p.faults[k].Message = "line " + strconv.Itoa(in.line) + ": " + in.p.faults[k].Message
	}
}

// append adds an operation's JSON to the chunk, and stores the chunk once
// full. Once the batch has a fault nothing more is stored: it is refused.
func (in *intake) append(raw []byte) {
	if len(in.p.faults) > 0 {
		return
	}
	if in.startsChunk(raw) {
		if err := in.store(); err != nil {
			in.fault("storing the batch: %v", err)
			return
		}
	}
	if in.inChunk > 0 {
		in.chunk = append(in.chunk, ',')
	} else {
		in.first = in.n - 1
	}
	in.chunk = append(in.chunk, raw...)
	in.inChunk++
}

// store stores the chunk being filled.
// store hands the chunk being filled to a write, which runs while the body
// is read on: at most chunkWrites at once, each holding its chunk.
func (in *intake) store() error {
	if err := in.writeErr(); err != nil {
		return err
	}
	spec := in.j.spec
	spec.Starts = append(spec.Starts, in.first)
	n, chunk := len(spec.Starts)-1, append(in.chunk, ']')
	in.writes <- struct{}{}
	in.wg.Go(func() {
		defer func() { <-in.writes }()
		if err := in.a.store.storeChunk(in.ctx, spec, in.j.rec.ID, n, chunk); err != nil {
			in.mu.Lock()
			in.err = cmp.Or(in.err, err)
			in.mu.Unlock()
		}
	})
	in.chunk, in.inChunk = append(make([]byte, 0, cap(in.chunk)), '['), 0
	return nil
}

// chunkWrites bounds the chunks of one upload being stored at once.
const chunkWrites = 8

// writeErr is the error a chunk's write failed with, if one has.
func (in *intake) writeErr() error {
	in.mu.Lock()
	defer in.mu.Unlock()
	return in.err
}

// stored waits for the chunks handed to writes, and says if one failed.
func (in *intake) stored() error {
	in.wg.Wait()
	return in.writeErr()
}

// finish checks what holds across the batch, and stores the last chunk.
func (in *intake) finish() error {
	switch {
	case in.tooMany:
		return tooManyOpsError{n: in.n, max: in.lim.maxOps}
	case in.n == 0 && len(in.p.faults) == 0:
		in.fault("batch has no operations")
	}
	in.duplicates()
	if err := in.p.errFaults(); err != nil {
		return err
	}
	err := in.store()
	if err == nil {
		err = in.stored()
	}
	if err != nil {
		return caddyhttp.Error(http.StatusServiceUnavailable, fmt.Errorf("storing async batch: %w", err))
	}
	spec := in.j.spec
	spec.Shape = in.shape
	if spec.Mode == "" {
		spec.Mode = in.a.h.Mode
	}
	if spec.Atomicity == "" {
		spec.Atomicity = in.a.h.Atomicity
		if spec.Atomicity == atomicAllOrNothing {
			spec.Atomicity = atomicStopOnError // what a streamed job can do of it
		}
	}
	if spec.Atomicity != atomicNone {
		spec.Mode = modeSequential
	}
	return nil
}

// duplicates finds ids given twice, and ids that are another operation's
// default one (its index).
func (in *intake) duplicates() {
	slices.SortFunc(in.ids, func(a, b idAt) int {
		if a.hash != b.hash {
			return cmpUint(a.hash, b.hash)
		}
		return int(a.index - b.index)
	})
	at := func(a idAt, msg string) fault {
		if a.line > 0 {
			msg = fmt.Sprintf("line %d: %s", a.line, msg)
		}
		return fault{Index: int(a.index), Message: msg}
	}
	for k := 1; k < len(in.ids) && !in.p.full(); k++ {
		if prev := in.ids[k-1]; in.ids[k].hash == prev.hash {
			in.p.faults = append(in.p.faults, at(in.ids[k], fmt.Sprintf("id is already used by operation %d", prev.index)))
		}
	}
	for _, num := range in.numeric {
		k := int(num.hash)
		if k < in.n && k != int(num.index) && (k/64 >= len(in.named) || in.named[k/64]&(1<<(k%64)) == 0) && !in.p.full() {
			in.p.faults = append(in.p.faults, at(num, fmt.Sprintf("id %d is the default id of operation %d, which gives none", k, k)))
		}
	}
}

func cmpUint(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// refuse answers a streamed batch that is not queued.
func (in *intake) refuse(w http.ResponseWriter, r *http.Request, err error) error {
	var faults badBatchError
	var tooMany tooManyOpsError
	var maxErr *http.MaxBytesError
	var netErr net.Error
	var he caddyhttp.HandlerError
	switch {
	case errors.As(err, &faults):
		return native.refuse(w, http.StatusBadRequest, "invalid batch", faults)
	case errors.As(err, &tooMany):
		return native.refuse(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("batch has more than the %d operations an async job may hold", tooMany.max), nil)
	case errors.As(err, &maxErr):
		return writeError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("batch body is larger than the %d bytes an async job may take", in.a.cfg.MaxBodySize))
	case errors.Is(err, errLineTooLong):
		return native.refuse(w, http.StatusBadRequest, "invalid batch", badBatchError{{Index: -1,
			Message: fmt.Sprintf("line %d: longer than max_body_size (%d bytes)", in.line, in.a.h.MaxBodySize)}})
	case errors.As(err, &netErr) && netErr.Timeout():
		return writeError(w, http.StatusRequestTimeout, "timed out reading the batch body")
	case r.Context().Err() != nil:
		return nil // the client is gone
	case errors.As(err, &he):
		return err
	}
	return writeError(w, http.StatusBadRequest, "reading the batch body: "+err.Error())
}

// readJSON reads a native batch: an array of operations, or an object
// with "batch" (or "operation" and "items") and options, in any order but
// "operation" before "items".
func (in *intake) readJSON(s *jsonStream) error {
	c, err := s.peek()
	if err != nil {
		return in.syntax(err)
	}
	if c == '[' {
		if err := in.readArray(s, in.addOp, true); err != nil {
			return in.syntax(err)
		}
		return in.end(s)
	}
	if _, err := s.next("{"); err != nil {
		return in.syntax(err)
	}
	seen := map[string]bool{}
	if c, err := s.peek(); err == nil && c == '}' {
		_, _ = s.next("}")
		in.fault("missing \"batch\": the array of operations")
		return in.end(s)
	}
	for {
		raw, err := s.value()
		if err != nil {
			return in.syntax(err)
		}
		if raw[0] != '"' || !gjson.ValidBytes(raw) {
			return in.syntax(fmt.Errorf("a field name must be a string, found %s", short(string(raw))))
		}
		key := gjson.ParseBytes(raw).String()
		if _, err := s.next(":"); err != nil {
			return in.syntax(err)
		}
		if seen[key] {
			in.fault("field %q given twice", short(key))
		}
		seen[key] = true
		switch key {
		case "batch":
			err = in.readArray(s, in.addOp, !seen["operation"])
		case "items":
			if !seen["operation"] {
				in.fault("\"operation\" must come before \"items\" in a batch of more than max_ops (%d) operations", in.a.h.MaxOps)
			}
			err = in.readArray(s, in.addItem, seen["operation"] && !seen["batch"])
		case "operation":
			if raw, err = s.value(); err == nil {
				in.bulkOperation(raw)
			}
		case "mode", "atomicity", "async", "dry_run", "omit_response_on_success", "include_headers", "max_attempts", "key_concurrency",
			"max_failures", "max_failure_rate", "metadata":
			if raw, err = s.value(); err == nil {
				in.option(key, gjson.ParseBytes(raw))
			}
		default:
			in.fault("unknown field %q", short(key))
			_, err = s.value()
		}
		if err != nil {
			return in.syntax(err)
		}
		if in.tooMany {
			return nil
		}
		c, err := s.next(",}")
		if err != nil {
			return in.syntax(err)
		}
		if c == '}' {
			break
		}
	}
	switch {
	case seen["batch"] && seen["operation"]:
		in.fault("give either \"batch\" or \"operation\" with \"items\", not both")
	case seen["operation"] && !seen["items"]:
		in.fault("\"operation\" needs \"items\"")
	case !seen["batch"] && !seen["operation"]:
		in.fault("missing \"batch\": the array of operations")
	}
	return in.end(s)
}

// readArray reads an array, passing each element to add while keep holds
// (and skipping them when not).
func (in *intake) readArray(s *jsonStream, add func([]byte), keep bool) error {
	if c, err := s.peek(); err != nil || c != '[' {
		in.fault("expected an array of operations")
		_, err := s.value()
		return err
	}
	_, _ = s.next("[")
	if c, err := s.peek(); err == nil && c == ']' {
		_, _ = s.next("]")
		return nil
	}
	for {
		raw, err := s.value()
		if err != nil {
			return err
		}
		if keep {
			add(raw)
			if in.tooMany {
				return nil
			}
		}
		if in.n%256 == 0 && in.ctx.Err() != nil {
			return in.ctx.Err()
		}
		c, err := s.next(",]")
		if err != nil {
			return err
		}
		if c == ']' {
			return nil
		}
	}
}

// bulkOperation takes the operation of a bulk batch.
func (in *intake) bulkOperation(raw []byte) {
	if problem, _ := jsontext.Check(raw, maxJSONDepth); problem != "" {
		in.fault("operation: operation %s", problem)
		return
	}
	spec := in.j.spec
	spec.Template = slices.Clone(raw)
	in.shape = shapeItems
	in.bulkOp = in.p.parseBulkOp(gjson.ParseBytes(spec.Template))
	in.noCredentials(in.bulkOp)
	in.encoding = gjson.GetBytes(spec.Template, "body_encoding")
}

// end checks that nothing but white space follows the batch.
func (in *intake) end(s *jsonStream) error {
	if c, err := s.peek(); err == nil {
		in.fault("batch is not valid JSON: %q after its end", c)
	} else if !errors.Is(err, io.EOF) {
		return err
	}
	return nil
}

// syntax turns an error reading JSON into a fault of the batch; errors of
// the body itself (too large, the client gone) pass.
func (in *intake) syntax(err error) error {
	var se syntaxError
	switch {
	case errors.As(err, &se):
		in.fault("batch is not valid JSON: %s", se.msg)
	case errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, io.EOF):
		in.fault("batch is not valid JSON: it ends early")
	case errors.Is(err, errValueTooLong):
		in.fault("operation %d is larger than max_body_size (%d bytes)", in.n, in.a.h.MaxBodySize)
	default:
		return err
	}
	return nil
}

// jsonStream reads JSON values one at a time, each at most max bytes, so
// that no more than one is in memory; it checks only what it needs to
// find where each ends. jsontext.Check validates each value.
type jsonStream struct {
	r   *bufio.Reader
	max int64
	buf []byte
}

type syntaxError struct{ msg string }

func (e syntaxError) Error() string { return e.msg }

var errValueTooLong = errors.New("value too long")

// peek returns the next byte but white space, unread.
func (s *jsonStream) peek() (byte, error) {
	for {
		c, err := s.r.ReadByte()
		if err != nil {
			return 0, err
		}
		switch c {
		case ' ', '\t', '\n', '\r':
			continue
		}
		return c, s.r.UnreadByte()
	}
}

// next reads the next byte but white space, which must be one of want.
func (s *jsonStream) next(want string) (byte, error) {
	c, err := s.peek()
	if err != nil {
		return 0, err
	}
	if !strings.ContainsRune(want, rune(c)) {
		return c, syntaxError{fmt.Sprintf("expected one of %q, found %q", want, c)}
	}
	_, _ = s.r.ReadByte()
	return c, nil
}

// value reads the next value, raw; the slice is valid until the next call.
func (s *jsonStream) value() ([]byte, error) {
	if _, err := s.peek(); err != nil {
		return nil, err
	}
	s.buf = s.buf[:0]
	depth, inString := 0, false
	for {
		c, err := s.r.ReadByte()
		if err != nil {
			if errors.Is(err, io.EOF) {
				if depth == 0 && !inString && len(s.buf) > 0 {
					return s.buf, nil // a scalar at the end
				}
				return nil, io.ErrUnexpectedEOF
			}
			return nil, err
		}
		if int64(len(s.buf)) >= s.max {
			return nil, errValueTooLong
		}
		if inString {
			s.buf = append(s.buf, c)
			switch c {
			case '\\':
				if c, err = s.r.ReadByte(); err != nil {
					return nil, io.ErrUnexpectedEOF
				}
				s.buf = append(s.buf, c)
			case '"':
				if inString = false; depth == 0 {
					return s.buf, nil
				}
			}
			continue
		}
		switch c {
		case '"':
			inString = true
		case '{', '[':
			depth++
		case '}', ']':
			if depth == 0 { // closes what holds a scalar
				return s.buf, s.r.UnreadByte()
			}
			if depth--; depth == 0 {
				return append(s.buf, c), nil
			}
		case ',', ':', ' ', '\t', '\n', '\r':
			if depth == 0 {
				return s.buf, s.r.UnreadByte()
			}
		}
		s.buf = append(s.buf, c)
	}
}
