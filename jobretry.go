package batch

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math"
	"net/http"
	"strconv"
	"strings"

	"github.com/caddy-batch/batch/internal/jsontext"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/tidwall/gjson"
)

// A rerun (SPEC §13): POST <batch path>/<id>/retry makes a new job of the
// failed and skipped operations of a job that has ended, read from its
// failures stream, in their original order, with its options, run with the
// credentials of the retry request. It is submitted as a POST of those
// operations would be, through the same code: the operations of a job
// stored whole become a native batch taken whole, validated with its
// dependencies; those of a streamed job an NDJSON body written from the
// failures stream into the streamed intake as it reads it, so that no more
// of a million failures is in memory than a part of them and a chunk.
//
// Each operation carries its index in the original job as source_index, a
// field that only a rerun's own operations may have (rules.sources, set by
// the spec's retry_of), and its results say it.

// rerunKey marks the context of a submission made by a rerun; its value
// is the id of the job rerun.
type rerunKey struct{}

// maxRerunBody bounds the body of a retry request: a few outcomes.
const maxRerunBody = 4 << 10

// notRerunOptions are the fields of a native envelope that are no options
// a rerun takes from its original: its operations, and what made it a
// job. Every other field (mode, atomicity, …) it takes as it was given.
var notRerunOptions = map[string]bool{"batch": true, "requests": true, "operation": true, "items": true,
	"async": true, "dry_run": true}

// rerun answers POST <batch path>/<id>/retry for rec, a job of the
// caller's: 202 with the new job, as a submission is answered.
func (a *asyncJobs) rerun(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler, j *job, rec jobRecord) error {
	outcomes, status, msg := readRerunBody(r)
	if status != 0 {
		return writeError(w, status, msg)
	}
	switch {
	case !rec.final():
		return writeProgress(w, http.StatusConflict, rec.progress)
	case !rec.Failures.Kept:
		return writeError(w, http.StatusConflict, "this batch job kept no record of its failures to rerun them from: "+
			"it was started by a version that kept none")
	case rec.Outcome == statusRolledBack || rec.Outcome == statusRollbackFailed:
		// Its undone operations count as succeeded: a rerun would leave
		// them out, and break the batch's all or nothing.
		return writeError(w, http.StatusConflict, "this batch job was rolled back: a rerun of its failures would leave out "+
			"the operations it undid; submit the batch again")
	case !hasOutcome(rec, outcomes):
		return writeError(w, http.StatusConflict, fmt.Sprintf("this batch job has no %s operations to rerun", outcomeList(outcomes)))
	}
	var spec *jobSpec
	if j != nil {
		spec = j.spec
	} else {
		var err error
		if spec, err = a.store.loadSpec(r.Context(), rec.ID); err != nil {
			return a.rerunFailed(w, err)
		}
	}
	// The new job is submitted at the batch path, with the headers of the
	// retry request: its owner, and what its operations inherit.
	sub := r.Clone(context.WithValue(r.Context(), rerunKey{}, rec.ID))
	sub.URL.Path = r.URL.Path[:strings.LastIndex(r.URL.Path, rec.ID)-1]
	if sub.URL.Path == "" {
		sub.URL.Path = "/"
	}
	sub.URL.RawPath, sub.URL.RawQuery = "", ""
	sub.Body, sub.ContentLength = http.NoBody, 0
	sub.Header.Del("Content-Length")
	if spec.Shape == shapeBody {
		sub.Header.Set("Content-Type", "application/json")
		return a.rerunWhole(w, sub, next, rec, spec, outcomes)
	}
	sub.Header.Set("Content-Type", "application/x-ndjson")
	return a.rerunStreamed(w, sub, next, rec, spec, outcomes)
}

// readRerunBody reads the body of a retry request: the outcomes to rerun,
// or a status and a message that say why not.
func readRerunBody(r *http.Request) (outcomes uint8, status int, msg string) {
	body, err := io.ReadAll(io.LimitReader(r.Body, maxRerunBody+1))
	switch {
	case err != nil:
		return 0, http.StatusBadRequest, "reading the retry body: " + err.Error()
	case len(body) > maxRerunBody:
		return 0, http.StatusRequestEntityTooLarge, fmt.Sprintf("a retry body is at most %d bytes", maxRerunBody)
	}
	// As for a batch: no body a browser may send cross-site unasked.
	if ct := r.Header.Get("Content-Type"); ct != "" && !isJSONType(ct) || ct == "" && len(body) > 0 {
		return 0, http.StatusUnsupportedMediaType, "a retry body must be sent with Content-Type: application/json"
	}
	outcomes, msg = parseRerunBody(body)
	if msg != "" {
		return 0, http.StatusBadRequest, msg
	}
	return outcomes, 0, ""
}

// parseRerunBody reads {"outcome":["failed","skipped"]}; none is both.
func parseRerunBody(body []byte) (outcomes uint8, msg string) {
	if len(bytes.TrimSpace(body)) == 0 {
		return failureOutcomes, ""
	}
	if problem, _ := jsontext.Check(body, 3); problem != "" {
		return 0, "retry body " + problem
	}
	v := gjson.ParseBytes(body)
	if !v.IsObject() {
		return 0, `retry body must be a JSON object, such as {"outcome":["failed"]}`
	}
	seen := false
	v.ForEach(func(k, val gjson.Result) bool {
		switch key := k.String(); {
		case key != "outcome":
			msg = fmt.Sprintf("unknown field %q: a retry body takes outcome", short(key))
		case seen:
			msg = `field "outcome" given twice`
		case !val.IsArray() || len(val.Array()) == 0:
			msg = fmt.Sprintf(`outcome must be an array of "failed" and "skipped", got %s`, short(val.Raw))
		default:
			seen = true
			val.ForEach(func(_, o gjson.Result) bool {
				switch {
				case o.Type == gjson.String && o.Str == "failed":
					outcomes |= 1 << outcomeFailed
				case o.Type == gjson.String && o.Str == "skipped":
					outcomes |= 1 << outcomeSkipped
				case o.Type == gjson.String && o.Str == "succeeded":
					msg = "outcome succeeded cannot be rerun: a job keeps the requests of its failed and skipped operations only"
				default:
					msg = fmt.Sprintf(`unknown outcome %s: outcome takes "failed" and "skipped"`, short(o.Raw))
				}
				return msg == ""
			})
		}
		return msg == ""
	})
	switch {
	case msg != "":
		return 0, msg
	case !seen:
		return failureOutcomes, ""
	}
	return outcomes, ""
}

// hasOutcome reports whether rec has operations of the outcomes.
func hasOutcome(rec jobRecord, outcomes uint8) bool {
	return outcomes&(1<<outcomeFailed) != 0 && rec.Failed > 0 || outcomes&(1<<outcomeSkipped) != 0 && rec.Skipped > 0
}

// outcomeList names the outcomes, as "failed or skipped".
func outcomeList(outcomes uint8) string {
	var names []string
	for o, name := range outcomeNames {
		if outcomes&(1<<o) != 0 {
			names = append(names, name)
		}
	}
	return strings.Join(names, " or ")
}

// rerunFailed answers a rerun whose reads of the original failed.
func (a *asyncJobs) rerunFailed(w http.ResponseWriter, err error) error {
	var he caddyhttp.HandlerError
	switch {
	case errors.As(err, &he):
		return err
	case errors.Is(err, errBadRecord), errors.Is(err, fs.ErrNotExist):
		return writeError(w, http.StatusInternalServerError, "what storage holds of this batch job is damaged: "+err.Error())
	}
	return caddyhttp.Error(http.StatusServiceUnavailable, fmt.Errorf("reading the batch job to rerun: %w", err))
}

// pickedOp is an operation of a whole job that a rerun runs again.
type pickedOp struct {
	index   int    // in the original
	request []byte // as the failures stream holds it
	group   string // its atomicity group, "" for none
}

// rerunWhole reruns the failures of a job stored whole: a native batch of
// them, with the options of the original, taken whole as a POST of it
// would be. Its operations are at most the original's, max_ops.
func (a *asyncJobs) rerunWhole(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler, rec jobRecord, spec *jobSpec, outcomes uint8) error {
	ctx := r.Context()
	var picked []pickedOp
	left := map[string]int{} // id → outcome, of the failures not rerun
	bad := -1
	err := a.store.eachFailure(ctx, rec, 0, rec.Completed-rec.Unstored, func(i, outcome int, res, req []byte) bool {
		switch {
		case outcomes&(1<<outcome) == 0:
			left[gjson.GetBytes(res, "id").String()] = outcome
			return true
		case len(req) < 2 || req[0] != '{':
			bad = i
			return false
		}
		// Cloned: the rest of the part it is read from goes.
		picked = append(picked, pickedOp{index: i, request: bytes.Clone(req), group: gjson.GetBytes(res, "atomicityGroup").String()})
		return true
	})
	if err == nil && bad >= 0 {
		err = fmt.Errorf("%w: the failure of operation %d has no request", errBadRecord, bad)
	}
	if err != nil {
		return a.rerunFailed(w, err)
	}
	if len(picked) == 0 { // not stored: the job ended in error before
		return writeError(w, http.StatusConflict, fmt.Sprintf("this batch job has no %s operations stored to rerun", outcomeList(outcomes)))
	}
	if faults := unmetDependencies(picked, left, rec); len(faults) > 0 {
		return writeFaultList(w, http.StatusUnprocessableEntity, "some of the operations to rerun cannot run alone", faults)
	}

	body := []byte(`{"batch":[`)
	for k, op := range picked {
		if k > 0 {
			body = append(body, ',')
		}
		body = appendRerunOp(body, op.index, op.request, rec.Format == jsonBatch.name())
	}
	body = append(body, ']')
	if rec.Format == "" {
		// The options the original batch gave; those it did not take the
		// handler's defaults, now as then.
		orig, err := a.store.loadChunk(ctx, spec, rec.ID, 0)
		if err != nil {
			return a.rerunFailed(w, err)
		}
		if top := gjson.ParseBytes(orig); top.IsObject() {
			top.ForEach(func(k, v gjson.Result) bool {
				if !notRerunOptions[k.String()] {
					body = append(append(append(append(body, ','), k.Raw...), ':'), v.Raw...)
				}
				return true
			})
		}
	}
	body = append(body, '}')
	if int64(len(body)) > a.h.MaxBodySize {
		return writeError(w, http.StatusRequestEntityTooLarge, fmt.Sprintf("the operations to rerun make a batch larger than %d bytes", a.h.MaxBodySize))
	}
	lim := a.h.rules
	lim.sources = true
	b, err := parseBatch(ctx, body, &lim)
	if err != nil {
		var faults badBatchError
		if !errors.As(err, &faults) {
			return refuseDecoded(w, r, native, err)
		}
		// Valid once, these operations are not under today's config.
		for k, f := range faults {
			if f.Index >= 0 && f.Index < len(picked) {
				faults[k].Index = picked[f.Index].index
			}
		}
		return writeFaultList(w, http.StatusUnprocessableEntity, "the operations to rerun are not a valid batch here", faults)
	}
	b.format, b.async = native, true
	return a.h.route(w, r, next, b, body)
}

// unmetDependencies lists, as faults at their index in the original, the
// operations to rerun that depend on (by depends_on, if or a reference)
// one not rerun, or that belong to an atomicity group, which a rerun (a
// native batch) has not.
func unmetDependencies(picked []pickedOp, left map[string]int, rec jobRecord) badBatchError {
	rerun := make(map[string]bool, len(picked))
	for _, op := range picked {
		rerun[gjson.GetBytes(op.request, "id").String()] = true
	}
	p := parser{}
	for _, op := range picked {
		req := gjson.ParseBytes(op.request)
		at := &operation{index: op.index, id: req.Get("id").String()}
		if op.group != "" {
			p.opFault(at, "it belongs to atomicityGroup %q: a rerun is a native batch, which has no atomicity groups", short(op.group))
			continue
		}
		// The failures stream writes every dependency in depends_on:
		// those an if or a reference implies too.
		req.Get("depends_on").ForEach(func(_, d gjson.Result) bool {
			if rerun[d.Str] {
				return true
			}
			was := ""
			if o, ok := left[d.Str]; ok {
				was = [...]string{outcomeFailed: "failed", outcomeSkipped: "was skipped"}[o] + " and "
			} else if rec.Completed-rec.Unstored == rec.Total {
				was = "succeeded and "
			}
			p.opFault(at, "depends on %q, which %sis not rerun", short(d.Str), was)
			return true
		})
	}
	_ = p.errFaults() // counts the faults past the bound
	return p.faults
}

// appendRerunOp appends the operation of a rerun that request, as the
// failures stream holds it, makes: with the source_index i, and its
// condition, in OData's syntax when odata (a JSON batch), in the native
// one.
func appendRerunOp(dst []byte, i int, request []byte, odata bool) []byte {
	dst = strconv.AppendInt(append(dst, `{"source_index":`...), int64(i), 10)
	gjson.ParseBytes(request).ForEach(func(k, v gjson.Result) bool {
		switch k.String() {
		case "source_index": // never written there; never taken from there
			return true
		case "if":
			if !odata {
				break
			}
			if c, msg := parseODataCondition(v.Str); msg == "" {
				c.odata = false
				dst = jsontext.AppendString(append(dst, `,"if":`...), c.String())
				return true
			}
		}
		dst = append(append(append(append(dst, ','), k.Raw...), ':'), v.Raw...)
		return true
	})
	return append(dst, '}')
}

// rerunStreamed reruns the failures of a streamed job: an NDJSON body,
// its options first, written from the failures stream as the streamed
// intake reads it.
func (a *asyncJobs) rerunStreamed(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler, rec jobRecord, spec *jobSpec, outcomes uint8) error {
	pr, pw := io.Pipe()
	written := make(chan struct{})
	go func() {
		defer close(written)
		pw.CloseWithError(a.writeRerun(r, pw, rec, spec, outcomes))
	}()
	err := a.submitStreamed(w, r, next, nil, pr, streamNDJSON)
	pr.CloseWithError(errRerunRead) // an intake that stopped early reads no more
	<-written
	return err
}

var errRerunRead = errors.New("the rerun's intake ended")

// writeRerun writes the NDJSON body of a rerun of a streamed job to w.
// An error reading the failures ends the body, and so the intake, with a
// HandlerError that says what the client gets.
func (a *asyncJobs) writeRerun(r *http.Request, w io.Writer, rec jobRecord, spec *jobSpec, outcomes uint8) error {
	opts, _ := json.Marshal(struct {
		Mode           string            `json:"mode,omitempty"`
		Atomicity      string            `json:"atomicity,omitempty"`
		OmitSuccess    bool              `json:"omit_response_on_success"`
		IncludeHeaders bool              `json:"include_headers"`
		MaxAttempts    int               `json:"max_attempts,omitempty"`
		KeyConcurrency int               `json:"key_concurrency,omitempty"`
		MaxFailures    int               `json:"max_failures,omitempty"`
		MaxFailureRate float64           `json:"max_failure_rate,omitempty"`
		Metadata       map[string]string `json:"metadata,omitempty"`
	}{spec.Mode, spec.Atomicity, spec.OmitSuccess, !spec.NoHeaders, spec.MaxAttempts, spec.KeyConcurrency,
		spec.MaxFailures, spec.MaxFailureRate, rec.Metadata})
	bw := bufio.NewWriterSize(w, 64<<10)
	_, werr := bw.Write(append(opts, '\n'))
	var line []byte
	var compact bytes.Buffer
	bad := -1
	err := a.store.eachFailure(r.Context(), rec, 0, rec.Completed-rec.Unstored, func(i, outcome int, _, req []byte) bool {
		switch {
		case werr != nil:
			return false
		case outcomes&(1<<outcome) == 0:
			return true
		case len(req) < 2 || req[0] != '{':
			bad = i
			return false
		}
		line = appendRerunOp(line[:0], i, req, false)
		if bytes.IndexByte(line, '\n') >= 0 { // a body as its API sent it
			compact.Reset()
			_ = json.Compact(&compact, line) // valid: checked when stored
			line = append(line[:0], compact.Bytes()...)
		}
		_, werr = bw.Write(append(line, '\n'))
		return werr == nil
	})
	switch {
	case werr != nil:
		return werr // the intake has ended
	case bad >= 0:
		err = fmt.Errorf("%w: the failure of operation %d has no request", errBadRecord, bad)
	}
	if err != nil {
		status := http.StatusServiceUnavailable
		if errors.Is(err, errBadRecord) {
			status = http.StatusInternalServerError
		}
		return caddyhttp.Error(status, fmt.Errorf("reading the batch job to rerun: %w", err))
	}
	return bw.Flush()
}

// parseSource takes the source_index of an operation of a rerun.
func (p *parser) parseSource(op *operation, v gjson.Result) {
	n := v.Int()
	if v.Type != gjson.Number || float64(n) != v.Num || n < 0 || n >= math.MaxInt32 {
		p.opFault(op, "source_index must be a whole number ≥ 0, got %s", short(v.Raw))
		return
	}
	op.source = int(n) + 1
}
