package batch

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"path"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/caddy-batch/batch/internal/jsontext"
	"github.com/caddy-batch/batch/internal/seal"
	"github.com/caddyserver/certmagic"
	"github.com/tidwall/gjson"
	"go.uber.org/zap"
)

// store is the one way jobs and idempotent answers reach Caddy's storage:
// where each thing is kept, and how its record is written and read.
type store struct {
	certmagic.Storage
	// sealer seals what may hold a credential; nil without a key.
	sealer *seal.Sealer
	logger *zap.Logger
}

// Where jobs live in storage.
const (
	jobsPrefix = "batch/jobs"
	// resultsPerChunk results are stored together: a large job writes one
	// key per chunk, never one growing blob. Offsets map to chunks by
	// count; a chunk whose results exceed partSize is stored in parts
	// (results/NNNNNN, then NNNNNN.1, NNNNNN.2 …), so that neither a job
	// nor a reader of its results holds more than one part.
	resultsPerChunk = 100
	partSize        = 1 << 20
)

// progress is what a client sees of a job.
type progress struct {
	ID          string     `json:"id"`
	Status      string     `json:"status"`
	Total       int        `json:"total"`
	Completed   int        `json:"completed"`
	Succeeded   int        `json:"succeeded"`
	Failed      int        `json:"failed"`
	Skipped     int        `json:"skipped"`
	CreatedAt   time.Time  `json:"created_at"`
	StartedAt   *time.Time `json:"started_at,omitempty"`
	UpdatedAt   *time.Time `json:"updated_at,omitempty"`
	CompletedAt *time.Time `json:"completed_at,omitempty"`
	// Rate is how many operations a second the job completed over the
	// last minute; EstimatedCompletionAt when, at that rate, it ends.
	Rate                  float64    `json:"operations_per_second,omitempty"`
	EstimatedCompletionAt *time.Time `json:"estimated_completion_at,omitempty"`
	// WindowEndsAt is the end of the job's completion window: an
	// operation not started by then never starts, and the job ends
	// expired. Unset in records stored before there were windows.
	WindowEndsAt *time.Time `json:"window_ends_at,omitempty"`
	// StopReason says what stopped a job that ended stopped.
	StopReason string            `json:"stop_reason,omitempty"`
	Error      string            `json:"error,omitempty"`
	Metadata   map[string]string `json:"metadata,omitempty"`
	// RetryOf is the job whose failures a rerun runs again.
	RetryOf string `json:"retry_of,omitempty"`
}

// jobRecord is what storage holds of a job besides its results.
type jobRecord struct {
	progress
	Outcome string `json:"outcome,omitempty"` // the envelope status, once ended
	// Format is the wire format the job was submitted in, which its
	// results are served in; "" for native.
	Format string `json:"format,omitempty"`
	Owner  string `json:"owner"` // hash of the owner's credentials
	// ExpiresAt is when the job is deleted: retention after it ended, or
	// after its window would end while it has not.
	ExpiresAt time.Time `json:"expires_at"`
	// Unstored counts the last results that storage did not take; the
	// first Completed-Unstored are stored. While the job runs, none are
	// unstored: the record is stored with each part of results, and
	// counts those stored so far, where a resumed job goes on.
	Unstored int `json:"unstored,omitempty"`
	// Stopped is the operation at which stop_on_error stopped the job.
	Stopped string `json:"stopped,omitempty"`
	// Unmet counts the skipped operations whose condition was false:
	// they leave the job completed.
	Unmet int `json:"unmet,omitempty"`
	// Failures locates the job's failed and skipped results in the
	// failures stream.
	Failures failureIndex `json:"failures,omitzero"`
	// Tested counts the failed operations that a condition tests: they
	// spend no failure budget.
	Tested int `json:"tested,omitempty"`
	// WindowPassed is set once an operation was skipped or cut off as the
	// window passed: the job ends expired.
	WindowPassed bool `json:"window_passed,omitempty"`
}

// failureIndex locates the failures stream of a job: its failed and
// skipped results stored a second time, each with its index and request
// (failures/NNNNNN, at most failuresPerPart a part), so that reading or
// rerunning them reads them, not every result.
type failureIndex struct {
	// Starts holds the index of the first result of each part.
	Starts []int `json:"starts,omitempty"`
	// Kept is set when the stream holds every failure of the job: not
	// for jobs started by a version that kept none.
	Kept bool `json:"kept,omitempty"`
	// Sealed is set when the parts are encrypted, as the job's
	// operations are: they hold requests.
	Sealed bool `json:"sealed,omitempty"`
}

func (p *progress) final() bool {
	switch p.Status {
	case stateCompleted, stateError, stateCanceled, stateStopped, stateExpired:
		return true
	}
	return false
}

// windowEnd is when the job's completion window ends; a job stored before
// there were windows ran until it expired.
func (r *jobRecord) windowEnd() time.Time {
	if r.WindowEndsAt == nil {
		return r.ExpiresAt
	}
	return *r.WindowEndsAt
}

func jobKey(id string, parts ...string) string {
	return path.Join(append([]string{jobsPrefix, id}, parts...)...)
}

// partKey is where part of a chunk of results is stored; part 0 has the
// chunk's own key, as chunks had before they were split.
func partKey(id string, chunk, part int) string {
	k := fmt.Sprintf("%06d", chunk)
	if part > 0 {
		k += "." + strconv.Itoa(part)
	}
	return jobKey(id, "results", k)
}

// failureKey is where part n of a job's failures stream is stored.
func failureKey(id string, n int) string { return jobKey(id, "failures", fmt.Sprintf("%06d", n)) }

// failurePart loads part n of rec's failures stream, checked whole: its
// entries, in order.
func (s *store) failurePart(ctx context.Context, rec jobRecord, n int) ([][]byte, error) {
	key := failureKey(rec.ID, n)
	buf, err := s.Load(ctx, key)
	if err == nil && rec.Failures.Sealed {
		if s.sealer == nil {
			return nil, fmt.Errorf("%w: failures of %s are encrypted, and no credentials_key is set", errBadRecord, rec.ID)
		}
		if buf, err = s.sealer.Open(key, buf); err != nil {
			err = fmt.Errorf("%w: %w", errBadRecord, err)
		}
	}
	if err != nil {
		return nil, err
	}
	items := jsontext.SplitTop(buf)
	for _, item := range items {
		if len(item) == 0 || item[0] != '{' || !jsontext.Valid(item, max(maxAnswerDepth, maxJSONDepth)+4) {
			return nil, fmt.Errorf("%w: failures of %s, part %d", errBadRecord, rec.ID, n)
		}
	}
	return items, nil
}

// errBadRecord marks a stored record (a job's, an idempotent answer's)
// that cannot be read: it is replaced or swept, never trusted.
var errBadRecord = errors.New("unreadable record")

// jobIDs lists the job ids under prefix; none, logged, if storage fails.
func (s *store) jobIDs(ctx context.Context, prefix string) []string {
	keys, err := s.List(ctx, prefix, false)
	if err != nil {
		if !errors.Is(err, fs.ErrNotExist) {
			s.logger.Warn("listing async batches", zap.String("prefix", prefix), zap.Error(err))
		}
		return nil
	}
	for i, k := range keys {
		keys[i] = path.Base(k)
	}
	return keys
}

// idleFor reports whether nothing under prefix has been written for d.
func (s *store) idleFor(ctx context.Context, prefix string, d time.Duration) bool {
	keys, err := s.List(ctx, prefix, true)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return false
	}
	since := now().Add(-d)
	for _, k := range append(keys, prefix) {
		info, err := s.Stat(ctx, k)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			// Gone meanwhile, or a prefix that is no key of its own.
		case err != nil || info.Modified.After(since):
			return false
		}
	}
	return true
}

// deleteTree deletes prefix and every key under it, key by key, as storage
// modules other than the file system need.
func deleteTree(ctx context.Context, s certmagic.Storage, prefix string) error {
	keys, err := s.List(ctx, prefix, true)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	for i := len(keys) - 1; i >= 0; i-- {
		if err := s.Delete(ctx, keys[i]); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
	}
	if err := s.Delete(ctx, prefix); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	return nil
}

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
	MaxAttempts int    `json:"max_attempts,omitempty"`
	// KeyConcurrency is 0 when the batch leaves it to the handler.
	KeyConcurrency int `json:"key_concurrency,omitempty"`
	// The failure budget of a streamed batch; 0 leaves it to the config.
	MaxFailures    int     `json:"max_failures,omitempty"`
	MaxFailureRate float64 `json:"max_failure_rate,omitempty"`
	// RetryOf is set on a rerun (jobretry.go): its chunks of operations
	// carry each one's source_index, which no other job's may.
	RetryOf string `json:"retry_of,omitempty"`

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

// credentialHeader reports whether an operation's own header may carry a
// credential: storage holds a job's operations as they were sent, so
// without a credentials key such a job is refused (inherited headers are
// kept in memory instead, see keepHeaders).
func credentialHeader(name string) bool {
	switch name = strings.ToLower(name); name {
	case "authorization", "proxy-authorization", "cookie":
		return true
	case "idempotency-key":
		return false
	}
	for _, part := range []string{"auth", "token", "secret", "password", "passwd", "session", "signature", "apikey", "api-key"} {
		if strings.Contains(name, part) {
			return true
		}
	}
	return strings.HasSuffix(name, "-key")
}

// storedCredentials lists, as faults, the operations of b whose own
// headers carry a credential.
func storedCredentials(b *batch) badBatchError {
	var faults badBatchError
	for _, op := range b.ops {
		for _, o := range []*operation{op, op.rollback} {
			if o == nil {
				continue
			}
			for name := range o.header {
				if credentialHeader(name) && len(faults) < maxFaults {
					faults = append(faults, fault{Index: op.index, ID: short(op.id), Message: credentialFault(name)})
				}
			}
		}
	}
	return faults
}

func credentialFault(name string) string {
	return fmt.Sprintf("header %s may carry a credential, and a job's operations are stored as sent: "+
		"set credentials_key to store them encrypted, or send it with the batch request, whose "+
		"headers operations inherit and a job keeps in memory", name)
}

// keepHeaders decides how spec holds the inherited headers.
func (s *store) keepHeaders(spec *jobSpec, id string, inherited http.Header) error {
	if len(inherited) == 0 {
		return nil
	}
	if s.sealer != nil {
		buf, err := json.Marshal(inherited)
		if err != nil {
			return err
		}
		spec.Sealed = s.sealer.Seal(jobKey(id, "headers"), buf)
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
func (s *store) openHeaders(spec *jobSpec, id string) (http.Header, error) {
	switch {
	case spec.Local:
		return nil, errLocalCredentials
	case spec.Sealed == nil:
		return spec.Headers, nil
	}
	buf, err := s.sealer.Open(jobKey(id, "headers"), spec.Sealed)
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
func (s *store) storeChunk(ctx context.Context, spec *jobSpec, id string, n int, buf []byte) error {
	key := chunkKey(id, n)
	if spec.SealedOps {
		buf = s.sealer.Seal(key, buf)
	}
	return s.Store(ctx, key, buf)
}

// loadChunk loads chunk n of a job's operations, opened when sealed.
func (s *store) loadChunk(ctx context.Context, spec *jobSpec, id string, n int) ([]byte, error) {
	key := chunkKey(id, n)
	buf, err := s.Load(ctx, key)
	if err != nil {
		return nil, fmt.Errorf("loading operations: %w", err)
	}
	if spec.SealedOps {
		return s.sealer.Open(key, buf)
	}
	return buf, nil
}

// Where an instance lists what it holds: under batch/held/<epoch>/, a
// heartbeat and one key per job (see lease.go).
const heldPrefix = "batch/held"

// heartbeatName is the heartbeat's key among an epoch's jobs, which are
// named by their ids.
const heartbeatName = "heartbeat"

func heldDir(epoch string) string { return path.Join(heldPrefix, epoch) }

func heldKey(epoch, id string) string { return path.Join(heldPrefix, epoch, id) }

func heartbeatKey(epoch string) string { return path.Join(heldPrefix, epoch, heartbeatName) }

// holderKey names the epoch that last took a job; it is also the name of
// the job's lock, under which it is taken.
func holderKey(id string) string { return jobKey(id, "holder") }

// heartbeat is what storage holds of an epoch's heartbeat.
type heartbeat struct {
	ExpiresAt time.Time `json:"expires_at"`
}

func (s *store) storeHeartbeat(ctx context.Context, epoch string, expires time.Time) error {
	buf, _ := json.Marshal(heartbeat{ExpiresAt: expires})
	return s.Store(ctx, heartbeatKey(epoch), buf)
}

func (s *store) loadHeartbeat(ctx context.Context, epoch string) (heartbeat, error) {
	var hb heartbeat
	buf, err := s.Load(ctx, heartbeatKey(epoch))
	if err != nil {
		return hb, err
	}
	if err := json.Unmarshal(buf, &hb); err != nil {
		return hb, fmt.Errorf("%w: heartbeat of %s: %w", errBadRecord, epoch, err)
	}
	return hb, nil
}

// holderRecord is what storage holds of a job's holder.
type holderRecord struct {
	Epoch string `json:"epoch"`
}

func (s *store) storeHolder(ctx context.Context, id, epoch string) error {
	buf, _ := json.Marshal(holderRecord{Epoch: epoch})
	return s.Store(ctx, holderKey(id), buf)
}

func (s *store) loadHolder(ctx context.Context, id string) (holderRecord, error) {
	var h holderRecord
	buf, err := s.Load(ctx, holderKey(id))
	if err != nil {
		return h, err
	}
	if err := json.Unmarshal(buf, &h); err != nil {
		return h, fmt.Errorf("%w: holder of %s: %w", errBadRecord, id, err)
	}
	return h, nil
}

// deleteKey deletes key, which may be gone already; it logs why not.
func (s *store) deleteKey(ctx context.Context, key string) {
	if err := s.Delete(ctx, key); err != nil && !errors.Is(err, fs.ErrNotExist) {
		s.logger.Warn("deleting from storage", zap.String("key", key), zap.Error(err))
	}
}

// isJobID reports whether name is a job id: storage may list other names
// beside them (the file system's temporary files, a heartbeat).
func isJobID(name string) bool {
	return len(name) == 32 && strings.Trim(name, "0123456789abcdef") == ""
}

func (s *store) loadSpec(ctx context.Context, id string) (*jobSpec, error) {
	buf, err := s.Load(ctx, jobKey(id, "spec"))
	if err != nil {
		return nil, err
	}
	spec := new(jobSpec)
	if err := json.Unmarshal(buf, spec); err != nil || len(spec.Starts) == 0 {
		return nil, fmt.Errorf("%w: spec of %s: %v", errBadRecord, id, err)
	}
	return spec, nil
}

func (s *store) storeSpec(ctx context.Context, id string, spec *jobSpec) error {
	buf, err := json.Marshal(spec)
	if err != nil {
		return err
	}
	return s.Store(ctx, jobKey(id, "spec"), buf)
}

func (s *store) loadJob(ctx context.Context, id string) (jobRecord, error) {
	var rec jobRecord
	buf, err := s.Load(ctx, jobKey(id, "job"))
	if err != nil {
		return rec, err
	}
	if err := json.Unmarshal(buf, &rec); err != nil {
		return rec, fmt.Errorf("%w: job %s: %w", errBadRecord, id, err)
	}
	return rec, nil
}

// storedRange calls put with each stored result of rec from offset up to
// end, loading one part at a time, until put returns false.
func (s *store) storedRange(ctx context.Context, rec jobRecord, offset, end int, put func(i int, item []byte) bool) error {
	stored := rec.Completed - rec.Unstored
	for c := offset / resultsPerChunk; c*resultsPerChunk < end; c++ {
		i := c * resultsPerChunk // index of the next result read
		last := min(i+resultsPerChunk, stored)
		for part := 0; i < last && i < end; part++ {
			buf, err := s.Load(ctx, partKey(rec.ID, c, part))
			if err == nil && len(buf) == 0 {
				err = errors.New("empty part")
			}
			if err != nil {
				return fmt.Errorf("loading batch job results: chunk %d part %d: %w", c, part, err)
			}
			items := jsontext.SplitTop(buf)
			// What was stored is read back only if it is still what was
			// written, results of valid JSON: a part is checked whole
			// before any of it is passed on.
			for k, item := range items {
				if len(item) == 0 || item[0] != '{' || !jsontext.Valid(item, maxAnswerDepth+2) {
					return fmt.Errorf("%w: result %d (chunk %d part %d)", errBadRecord, i+k, c, part)
				}
			}
			for _, item := range items {
				if i >= offset && i < end && !put(i, item) {
					return nil
				}
				i++
			}
		}
	}
	return nil
}

// eachFailure calls put with each entry of rec's failures stream whose
// index is from offset up to end, in order, until put returns false: its
// outcome, result and request. It reads the parts from the one that holds
// offset on.
func (s *store) eachFailure(ctx context.Context, rec jobRecord, offset, end int,
	put func(i, outcome int, result, request []byte) bool) error {
	starts := rec.Failures.Starts
	for n := max(sort.SearchInts(starts, offset+1)-1, 0); n < len(starts) && starts[n] < end; n++ {
		items, err := s.failurePart(ctx, rec, n)
		if err != nil {
			return fmt.Errorf("loading the failures of batch job results: part %d: %w", n, err)
		}
		for _, item := range items {
			i, outcome, res, req := -1, -1, []byte(nil), []byte(nil)
			gjson.ParseBytes(item).ForEach(func(k, v gjson.Result) bool {
				switch k.Str {
				case "index":
					i = int(v.Int())
				case "outcome":
					outcome = slices.Index(outcomeNames[:], v.Str)
				case "result":
					res = rawOf(item, v)
				case "request":
					req = rawOf(item, v)
				}
				return true
			})
			switch {
			case i < 0 || outcome < 0 || len(res) == 0 || res[0] != '{':
				return fmt.Errorf("%w: failures of %s, part %d", errBadRecord, rec.ID, n)
			case i < offset:
				continue
			case i >= end || !put(i, outcome, res, req):
				return nil
			}
		}
	}
	return nil
}

// rawOf returns the bytes of v, a value gjson found in buf.
func rawOf(buf []byte, v gjson.Result) []byte {
	if v.Index > 0 && v.Index+len(v.Raw) <= len(buf) {
		return buf[v.Index : v.Index+len(v.Raw)]
	}
	return []byte(v.Raw)
}

func eventKey(id string) string { return jobKey(id, "event") }

func (s *store) storeEvent(ctx context.Context, jobID string, ev *webhookEvent) error {
	buf, err := json.Marshal(ev)
	if err != nil {
		return err
	}
	return s.Store(ctx, eventKey(jobID), buf)
}

func (s *store) loadEvent(ctx context.Context, jobID string) (*webhookEvent, error) {
	buf, err := s.Load(ctx, eventKey(jobID))
	if err != nil {
		return nil, err
	}
	ev := new(webhookEvent)
	if err := json.Unmarshal(buf, ev); err != nil {
		return nil, fmt.Errorf("%w: event of %s: %w", errBadRecord, jobID, err)
	}
	return ev, nil
}
