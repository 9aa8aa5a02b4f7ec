<#
.SYNOPSIS
Install (or remove) the cis490fleet worker as a Scheduled Task on this Windows host.

.DESCRIPTION
What `python cis490fleet.pyz enroll worker` does on Windows, for hosts where you would
rather run PowerShell: copies the zipapp to %ProgramData%\cis490fleet\cis490fleet.pyz
(from -Pyz, else downloaded from the coordinator's /v1/zipapp: https:// only unless
-Insecure), refuses it unless its sha256 is -ZipappSha256 (the pin `jobs hosts add`
prints; a header of the same response proves nothing), installs the host key (-HostKeyFile,
or - to take it from the pipeline) readable by SYSTEM, Administrators and -Account only,
writes %ProgramData%\cis490fleet\worker.toml unless it exists,
and registers the task "cis490fleet-worker": it starts at boot under -Account, restarts
on failure (RestartCount/RestartInterval), and a 5-minute repetition starts it again if
it ever exited (one instance at a time). -Uninstall removes all of it; the work folder
stays unless -Purge is given. Run it from an elevated PowerShell.

.EXAMPLE
'KEY-FROM-JOBS-HOSTS-ADD' | .\install-worker.ps1 -Receiver https://coord.lab:8445 -HostId ws3 -HostKeyFile - -ZipappSha256 HEX
.EXAMPLE
.\install-worker.ps1 -Uninstall
#>
[CmdletBinding()]
param(
    [string[]]$Receiver = @(),
    [string]$HostId = '',
    [string]$Account = 'NT AUTHORITY\NETWORK SERVICE',
    [string]$Python = '',
    [string]$Pyz = '',
    [int]$Slots = 0,
    [double]$GraceS = 30,
    [string]$Ca = '',
    [string]$Cert = '',
    [string]$Key = '',
    [string]$HostKeyFile = '',
    [string]$ZipappSha256 = '',
    [Parameter(ValueFromPipeline = $true)]
    [string]$PipedHostKey = '',
    [switch]$Insecure,
    [switch]$NoStart,
    [switch]$Uninstall,
    [switch]$Purge
)

Set-StrictMode -Version Latest
$ErrorActionPreference = 'Stop'

$TaskName = 'cis490fleet-worker'
$Base = Join-Path $env:ProgramData 'cis490fleet'
$PyzPath = Join-Path $Base 'cis490fleet.pyz'
$Config = Join-Path $Base 'worker.toml'
$WorkDir = Join-Path $Base 'work'
$ServiceAccounts = @('NT AUTHORITY\SYSTEM', 'SYSTEM', 'NT AUTHORITY\LOCAL SERVICE', 'NT AUTHORITY\NETWORK SERVICE')

function Stop-WithError([string]$Message) {
    [Console]::Error.WriteLine("install-worker: $Message")
    exit 1
}

# Leaves $Path to SYSTEM and Administrators (full) and $Reader (read): inheritance off, every other entry gone.
function Set-SecretAcl([string]$Path, [string]$Reader) {
    & icacls.exe $Path /inheritance:r /grant:r '*S-1-5-18:(F)' /grant:r '*S-1-5-32-544:(F)' /grant:r "${Reader}:(R)" | Out-Null
    if ($LASTEXITCODE -ne 0) { Stop-WithError "cannot restrict the ACL of $Path (icacls exit $LASTEXITCODE)" }
}

# Writes a secret: an empty file gets its ACL first, then the bytes, then it takes the final name.
function Write-Secret([string]$Path, [string]$Text, [string]$Reader) {
    $part = "$Path.part"
    if (Test-Path -LiteralPath $part) { Remove-Item -LiteralPath $part -Force }
    [IO.File]::WriteAllText($part, '', (New-Object Text.UTF8Encoding($false)))
    Set-SecretAcl $part $Reader
    [IO.File]::WriteAllText($part, $Text, (New-Object Text.UTF8Encoding($false)))
    Move-Item -LiteralPath $part -Destination $Path -Force
}

function ConvertTo-TomlString([string]$Text) {
    $escaped = $Text.Replace('\', '\\').Replace('"', '\"')
    return '"' + $escaped + '"'
}

$identity = [Security.Principal.WindowsPrincipal][Security.Principal.WindowsIdentity]::GetCurrent()
if (-not $identity.IsInRole([Security.Principal.WindowsBuiltInRole]::Administrator)) {
    Stop-WithError 'run this from an elevated PowerShell (Run as administrator)'
}

if ($Uninstall) {
    if (Get-ScheduledTask -TaskName $TaskName -ErrorAction SilentlyContinue) {
        Stop-ScheduledTask -TaskName $TaskName -ErrorAction SilentlyContinue
        Unregister-ScheduledTask -TaskName $TaskName -Confirm:$false
        Write-Output "removed task $TaskName"
    }
    $owned = @($PyzPath, $Config, (Join-Path $Base "$TaskName.xml"), (Join-Path $Base 'enrolled-worker.json'),
               (Join-Path $Base 'host-signing.key'),
               (Join-Path $Base 'ca.pem'), (Join-Path $Base 'host.pem'), (Join-Path $Base 'host.key'))
    foreach ($file in $owned) {
        if (Test-Path -LiteralPath $file) {
            Remove-Item -LiteralPath $file -Force
            Write-Output "removed $file"
        }
    }
    if ($Purge -and (Test-Path -LiteralPath $WorkDir)) {
        Remove-Item -LiteralPath $WorkDir -Recurse -Force
        Write-Output "removed folder $WorkDir"
    }
    if ((Test-Path -LiteralPath $Base) -and -not (Get-ChildItem -LiteralPath $Base -Force)) {
        Remove-Item -LiteralPath $Base -Force
    }
    if (-not $Purge) { Write-Output "uninstalled; $WorkDir kept (add -Purge to remove it)" }
    exit 0
}

if ($Receiver.Count -eq 0) {
    Stop-WithError 'give the coordinator URL: -Receiver https://coord.lab:8445 (repeat for several peers)'
}
foreach ($url in $Receiver) {
    if ($url -notmatch '^https?://[^/\s]+') {
        Stop-WithError "-Receiver $url is not an http:// or https:// URL (e.g. https://coord.lab:8445)"
    }
}
if (-not $HostId) { $HostId = $env:COMPUTERNAME.ToLowerInvariant() }
if ($HostId -notmatch '^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$') {
    Stop-WithError "host id '$HostId' is not valid (letters, digits, '.', '_', '-', at most 63); pass -HostId"
}
if ([bool]$Cert -ne [bool]$Key) { Stop-WithError 'a client certificate needs both -Cert and -Key' }
if ($ZipappSha256 -and $ZipappSha256 -notmatch '^[0-9a-fA-F]{64}$') {
    Stop-WithError "-ZipappSha256 $ZipappSha256 is not a sha256 (64 hex digits); copy it from ``jobs hosts add``"
}
if (-not $Pyz -and -not $ZipappSha256) {
    Stop-WithError 'a downloaded zipapp needs -ZipappSha256 HEX to pin it (`jobs hosts add` prints it), or pass -Pyz'
}
if (-not $Pyz -and $Receiver[0] -match '^http://' -and -not $Insecure) {
    Stop-WithError "refusing a plain http:// download from $($Receiver[0]); use https://, or add -Insecure on a trusted network"
}
$HostKeyText = ''
if ($HostKeyFile -eq '-') {
    $HostKeyText = $PipedHostKey.Trim()
} elseif ($HostKeyFile) {
    if (-not (Test-Path -LiteralPath $HostKeyFile)) { Stop-WithError "-HostKeyFile $HostKeyFile does not exist" }
    $HostKeyText = ([IO.File]::ReadAllText($HostKeyFile)).Trim()
}
if ($HostKeyFile -and $HostKeyText -cnotmatch '^[0-9a-f]{64}$') {
    Stop-WithError 'the host key is missing or malformed (64 hex digits); give the key `jobs hosts add HOST` printed'
}

# The interpreter the task runs: -Python, else the newest the py launcher knows, else python.exe on PATH.
if (-not $Python) {
    $launcher = Get-Command py.exe -ErrorAction SilentlyContinue
    if ($launcher) {
        $Python = (& $launcher.Source -3 -c 'import sys; print(sys.executable)' 2>$null | Select-Object -Last 1)
    }
    if (-not $Python) {
        $found = Get-Command python.exe -ErrorAction SilentlyContinue
        if ($found) { $Python = $found.Source }
    }
}
if (-not $Python -or -not (Test-Path -LiteralPath $Python)) {
    Stop-WithError 'no Python found; install Python >= 3.11 for all users, or pass -Python C:\path\to\python.exe'
}
& $Python -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'
if ($LASTEXITCODE -ne 0) {
    Stop-WithError "$Python is older than Python 3.11; install a newer one or pass -Python"
}

New-Item -ItemType Directory -Force -Path $Base, $WorkDir | Out-Null

$part = "$PyzPath.part"
if ($Pyz) {
    if (-not (Test-Path -LiteralPath $Pyz)) { Stop-WithError "-Pyz $Pyz does not exist" }
    Copy-Item -LiteralPath $Pyz -Destination $part -Force
    $source = $Pyz
} else {
    $source = $Receiver[0].TrimEnd('/') + '/v1/zipapp'
    try {
        Invoke-WebRequest -Uri $source -OutFile $part -UseBasicParsing | Out-Null
    } catch {
        Stop-WithError "cannot download $source ($($_.Exception.Message)); copy cis490fleet.pyz here and pass -Pyz"
    }
}
# The pin comes from the operator, never from the response that brought the bytes.
$actual = (Get-FileHash -Algorithm SHA256 -LiteralPath $part).Hash.ToLowerInvariant()
if ($ZipappSha256 -and $actual -ne $ZipappSha256.ToLowerInvariant()) {
    Remove-Item -LiteralPath $part -Force
    Stop-WithError "$source has sha256 $actual, not the pinned $($ZipappSha256.ToLowerInvariant()); nothing was installed"
}
Move-Item -LiteralPath $part -Destination $PyzPath -Force
Write-Output "installed $PyzPath"

$KeyTarget = Join-Path $Base 'host-signing.key'
if ($HostKeyText) {
    Write-Secret $KeyTarget ($HostKeyText + "`n") $Account
    Write-Output "installed $KeyTarget (SYSTEM, Administrators and $Account only)"
}

$tls = @{}
foreach ($pair in @(@('ca', $Ca, 'ca.pem'), @('cert', $Cert, 'host.pem'), @('key', $Key, 'host.key'))) {
    if ($pair[1]) {
        $target = Join-Path $Base $pair[2]
        if ($pair[0] -eq 'key') {
            Write-Secret $target ([IO.File]::ReadAllText($pair[1])) $Account
        } else {
            Copy-Item -LiteralPath $pair[1] -Destination $target -Force
        }
        $tls[$pair[0]] = $target
    }
}

if (Test-Path -LiteralPath $Config) {
    Write-Output "kept $Config (it exists; delete it and re-run to write a new one)"
} else {
    $lines = @(
        '# cis490fleet worker settings, written by install-worker.ps1.',
        '# It keeps this file once it exists; edit it, then restart the task.',
        ('receiver = [' + (($Receiver | ForEach-Object { ConvertTo-TomlString $_ }) -join ', ') + ']'),
        ('host_id = ' + (ConvertTo-TomlString $HostId)),
        ('work_dir = ' + (ConvertTo-TomlString $WorkDir)),
        ('grace_s = ' + $GraceS.ToString([Globalization.CultureInfo]::InvariantCulture))
    )
    if ($Slots -gt 0) { $lines += "slots = $Slots" }
    foreach ($name in @('ca', 'cert', 'key')) {
        if ($tls.ContainsKey($name)) { $lines += ($name + ' = ' + (ConvertTo-TomlString $tls[$name])) }
    }
    [IO.File]::WriteAllText($Config, ($lines -join "`n") + "`n", (New-Object Text.UTF8Encoding($false)))
    Write-Output "created $Config"
}

& icacls.exe $WorkDir /grant "${Account}:(OI)(CI)M" | Out-Null

$workArgs = "`"$PyzPath`" work --config `"$Config`""
if (Test-Path -LiteralPath $KeyTarget) { $workArgs += " --host-key-file `"$KeyTarget`"" }
$action = New-ScheduledTaskAction -Execute $Python -Argument $workArgs -WorkingDirectory $Base
$atBoot = New-ScheduledTaskTrigger -AtStartup
$again = New-ScheduledTaskTrigger -Once -At ([datetime]'2024-01-01T00:00:00') -RepetitionInterval (New-TimeSpan -Minutes 5)
if ($ServiceAccounts -contains $Account.ToUpperInvariant()) {
    $principal = New-ScheduledTaskPrincipal -UserId $Account -LogonType ServiceAccount -RunLevel Limited
} else {
    $principal = New-ScheduledTaskPrincipal -UserId $Account -LogonType S4U -RunLevel Limited
}
$settings = New-ScheduledTaskSettingsSet -RestartCount 999 -RestartInterval (New-TimeSpan -Minutes 1) `
    -ExecutionTimeLimit ([TimeSpan]::Zero) -MultipleInstances IgnoreNew -StartWhenAvailable `
    -AllowStartIfOnBatteries -DontStopIfGoingOnBatteries
Register-ScheduledTask -TaskName $TaskName -Action $action -Trigger @($atBoot, $again) -Principal $principal `
    -Settings $settings -Description 'cis490fleet worker (trains jobs handed out by the fleet coordinator)' `
    -Force | Out-Null
Write-Output "registered task $TaskName (runs as $Account)"

if (-not $NoStart) {
    Stop-ScheduledTask -TaskName $TaskName -ErrorAction SilentlyContinue
    Start-ScheduledTask -TaskName $TaskName
    Write-Output "started $TaskName"
}
Write-Output "worker enrolled as $HostId"
